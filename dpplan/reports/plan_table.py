"""The plan as a terminal table (rich)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dpplan.planner.hardware import lookup_gpu
from dpplan.planner.plan import Plan, PlanDocument
from dpplan.reports.plan_recommendation import headroom_text, nodes_text, render_recommendation
from dpplan.reports.units import format_bytes, format_count, format_gib

TABLE_WIDTH = 120
"""Columns fit in this width; used when the output is not a terminal (rich would assume 80)."""


def _header(document: PlanDocument) -> list[str]:
    config, model = document.plan.config, document.plan.model
    units = f"{model.num_units} FSDP/checkpoint units" if model.num_units else "no units (root only)"
    if model.num_units:
        first, last = model.unit_names[0], model.unit_names[-1]
        units += f" ({escape(first)} … {escape(last)})" if model.num_units > 1 else f" ({escape(first)})"
    if model.repeated_layers:
        units += f" · traced at 3 and 4 layers, built to {model.repeated_layers}"
    if config.device == "cuda":
        gpu = lookup_gpu(config.gpu)
        target = f"{gpu.description} ({format_bytes(gpu.memory_bytes)})"
    else:
        kernels = f" · {document.cpu_kernels}" if document.cpu_kernels else ""
        target = f"CPU (gloo): live tensor bytes, capacity = this machine's RAM / ranks per node{kernels}"
    checkpointing = {"none": "no checkpointing", "model": "checkpointing (model's own)", "units": "checkpointing per unit"}[
        model.checkpointing
    ] if config.run.activation_checkpointing else "no checkpointing"
    return [
        f"[bold]{escape(model.name)}[/bold] · {format_count(model.num_params)} parameters "
        f"({format_count(model.num_trainable_params)} trainable) · {units}",
        f"micro-batch {config.run.batch_size} per GPU{_tokens(model)} · grad accum {config.run.grad_accum} · "
        f"{config.run.precision} · "
        f"{config.run.optimizer} · {checkpointing} · offload {config.run.offload} · "
        + (f"tensor parallel {config.run.tp}{' + sequence parallel' if config.run.sequence_parallel else ''} · "
           if config.run.tp > 1 else "")
        + (f"expert parallel {config.run.ep} · " if config.run.ep > 1 else "")
        + nodes_text(config),
        f"target: {target} · {headroom_text(config)}",
    ]


def _tokens(model) -> str:
    """`` (sequence 256, 512 tokens)``: the planned batch's token count, when it has tokens."""
    if model.tokens_per_micro_batch is None:
        return ""
    return f" (sequence {model.seq_len}, {model.tokens_per_micro_batch} tokens)"


def render_plan(document: PlanDocument, console: Console | None = None) -> None:
    plan = document.plan
    if console is None:
        console = Console()
        if not console.is_terminal and console.width < TABLE_WIDTH:
            console = Console(width=TABLE_WIDTH)
    for line in _header(document):
        console.print(line, highlight=False)
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    table.add_column("GPUs", justify="right")
    # the layout column only where a plan goes beyond data parallelism (dp4 x tp2 +sp)
    show_layout = any(e.tp > 1 or e.pp > 1 or e.cp > 1 or e.ep > 1 for e in plan.estimates)
    if show_layout:
        table.add_column("layout")
    table.add_column("strategy")
    table.add_column("peak GiB", justify="right")
    for name in ("params", "grads", "optim", "activ", "other"):
        table.add_column(name, justify="right")
    table.add_column("fits", justify="center")
    table.add_column("max batch", justify="right")
    table.add_column("peak in")
    show_host = any(e.host_bytes is not None for e in plan.estimates)
    if show_host:
        table.add_column("host GiB/node", justify="right")
    previous_gpus = None
    for e in plan.estimates:
        if previous_gpus is not None and e.gpus != previous_gpus:
            table.add_section()
        previous_gpus = e.gpus
        b = e.breakdown
        fits = Text("yes", style="green") if e.fits else Text("no", style="bold red")
        host = [format_gib(e.host_bytes) if e.host_bytes is not None else "-"] if show_host else []
        table.add_row(
            str(e.gpus),
            *([e.layout] if show_layout else []),
            e.strategy,
            Text(format_gib(e.peak_bytes), style="bold"),
            format_gib(b["params"]),
            format_gib(b["grads"]),
            format_gib(b["optimizer"]),
            format_gib(b["activations"]),
            format_gib(b["other"]),
            fits,
            str(e.max_batch_size),
            e.peak_phase,
            *host,
        )
    console.print(table)
    if plan.config.device == "cuda":
        console.print(
            "peak = tensors (allocator-rounded) + allocator slack + CUDA context + NCCL buffers, "
            "per GPU, most loaded rank; GiB = 2^30 bytes.",
            style="dim",
            highlight=False,
        )
    modules = plan.model.top_activation_modules
    if modules:
        console.print("[bold]Activation memory kept for backward, by module[/bold] (per micro-batch):")
        for m in modules[:5]:
            console.print(f"  {format_bytes(m.activation_bytes):>11}  {escape(m.name)} ({escape(m.class_name)})", highlight=False)
    for note in merged_notes(plan):
        console.print(f"note: {escape(note)}", style="yellow", highlight=False)
    by_reason: dict[str, list[str]] = {}
    for strategy, reason in plan.unsupported.items():
        by_reason.setdefault(reason, []).append(strategy)
    for reason, strategies in by_reason.items():
        console.print(f"not planned: {', '.join(strategies)}: {escape(reason)}", style="yellow", highlight=False)
    render_recommendation(document, console)


def merged_notes(plan: Plan) -> list[str]:
    return merge_notes((estimate.strategy, estimate.notes) for estimate in plan.estimates)


def merge_notes(notes_by_strategy: Iterable[tuple[str, list[str]]]) -> list[str]:
    """Each note once; notes that differ only in the strategy they name are said once for all
    of them ("zero1, zero2, zero3 include ..."). Takes (strategy, notes) of each estimate."""
    by_template: dict[str, list[str]] = {}
    for strategy, notes in notes_by_strategy:
        for note in notes:
            named = strategy if re.search(rf"(?<![\w-]){re.escape(strategy)}(?![\w-])", note) else None
            template = note.replace(named, "\0") if named else note
            strategies = by_template.setdefault(template, [])
            if named and named not in strategies:
                strategies.append(named)
    merged = []
    for template, strategies in by_template.items():
        merged.append(template.replace("\0", ", ".join(strategies)) if strategies else template)
    return sorted(merged)
