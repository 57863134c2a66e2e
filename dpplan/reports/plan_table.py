"""The plan as a terminal table (rich)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

from rich import box
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dpplan.planner.hardware import lookup_gpu
from dpplan.planner.plan import Plan, PlanDocument, StrategyEstimate
from dpplan.reports.plan_recommendation import headroom_text, nodes_text, render_recommendation
from dpplan.reports.stage_text import IN_FLIGHT_MEANING, pipeline_estimates, pipeline_text, stage_parts
from dpplan.reports.terminal_width import (
    PART_SEPARATOR,
    TableLayout,
    first_that_fits,
    natural_width,
    pack_parts,
    print_layout,
    print_parts,
    report_console,
)
from dpplan.reports.units import format_bytes, format_count, format_gib


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
        + (f"{pipeline_text(config.run)} · " if config.run.pp > 1 else "")
        + (f"context parallel {config.run.cp} (by rule, not validated) · " if config.run.cp > 1 else "")
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
        console = report_console()
    for line in _header(document):
        print_parts(console, line)
    print_layout(console, first_that_fits(console, estimate_layouts(plan.estimates, console)))
    if plan.config.device == "cuda":
        console.print(
            "peak = tensors (allocator-rounded) + allocator slack + CUDA context + NCCL buffers, "
            "per GPU, most loaded rank; GiB = 2^30 bytes.",
            style="dim",
            highlight=False,
        )
    render_stages(plan.estimates, console)
    modules = plan.model.top_activation_modules
    if modules:
        console.print(f"[bold]Activation memory kept for backward, by module[/bold] (per micro-batch, one rank of "
                      f"{escape(activation_trace_owner(plan))}):", highlight=False)
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


STAGE_INDENT = 2
"""Spaces before a stage line; its continuation lines take twice as many."""


def render_stages(estimates: list[StrategyEstimate], console: Console) -> None:
    """Under the table, a line per estimate with a pipeline: its heaviest pipeline rank (whose
    peak is the table's) with what it holds, the lightest, and each rank's micro-batches in
    flight. Broken only between those parts to fit the console, continuations indented."""
    pipelines = pipeline_estimates(estimates)
    if not pipelines:
        return
    print_parts(console, f"[bold]Pipeline stages[/bold] per GPU{PART_SEPARATOR}{IN_FLIGHT_MEANING}:")
    for e in pipelines:
        line = PART_SEPARATOR.join(escape(part) for part in stage_parts(e))
        for index, piece in enumerate(pack_parts(line, console.width - 2 * STAGE_INDENT)):
            console.print(" " * (STAGE_INDENT if index == 0 else 2 * STAGE_INDENT) + piece, highlight=False)


def activation_trace_owner(plan: Plan) -> str:
    """Whose step the top activation modules were read from: ``fsdp2 on 2, 4 or 8 GPUs``.

    planner/estimate.py summarizes the model from its first trace, the one made for the first
    strategy planned (the order asked, less what the wrapper refused); strategies traced apart
    (autocast for single/ddp, cast parameters for FSDP and ZeRO under bf16-mixed) keep other
    bytes. The trace is one rank's step, so its modules' bytes hold at each of the strategy's
    GPU counts (with --tp: one tensor-parallel rank's)."""
    strategy = next(s for s in plan.config.strategies if s not in plan.unsupported)
    counts = sorted({e.gpus for e in plan.estimates if e.strategy == strategy})
    if not counts:
        return f"{strategy}, traced though not planned at these GPU counts"
    listed = str(counts[0]) if len(counts) == 1 else f"{', '.join(map(str, counts[:-1]))} or {counts[-1]}"
    owner = f"{strategy} on {listed} GPU{'s' if counts != [1] else ''}"
    tp = plan.config.run.tp
    return owner + (f", tp {tp}" if tp > 1 else "")


class EstimateColumn(NamedTuple):
    """A column of the estimate table: its header in a wide and a narrow terminal, and its cell."""

    header: str
    narrow_header: str
    cell: Callable[[StrategyEstimate], str | Text]
    justify: JustifyMethod = "right"


def _fits(e: StrategyEstimate) -> Text:
    return Text("yes", style="green") if e.fits else Text("no", style="bold red")


def _breakdown(key: str) -> Callable[[StrategyEstimate], str]:
    return lambda e: format_gib(e.breakdown[key])


GPUS = EstimateColumn("GPUs", "GPUs", lambda e: str(e.gpus))
LAYOUT = EstimateColumn("layout", "layout", lambda e: e.layout, "left")
STRATEGY = EstimateColumn("strategy", "strategy", lambda e: e.strategy, "left")
PEAK = EstimateColumn("peak GiB", "peak\nGiB", lambda e: Text(format_gib(e.peak_bytes), style="bold"))
BREAKDOWN = [
    EstimateColumn(name, name, _breakdown(key))
    for name, key in (("params", "params"), ("grads", "grads"), ("optim", "optimizer"), ("activ", "activations"),
                      ("other", "other"))
]
FITS = EstimateColumn("fits", "fits", _fits, "center")
MAX_BATCH = EstimateColumn("max batch", "max\nbatch", lambda e: str(e.max_batch_size))
PEAK_IN = EstimateColumn("peak in", "peak\nin", lambda e: e.peak_phase, "left")
HOST = EstimateColumn("host GiB/node", "host GiB\nper node",
                      lambda e: format_gib(e.host_bytes) if e.host_bytes is not None else "-")


def estimate_layouts(estimates: list[StrategyEstimate], console: Console) -> list[TableLayout]:
    """The estimate table's layouts, widest first (terminal_width.first_that_fits picks one):
    today's full table; the same with two-line headers and two spaces between columns; without
    the phase of the peak; then split in two, what fits (GPUs, strategy, peak, fits, largest
    micro-batch) above where the memory goes. The last also folds a cell too wide for a very
    narrow terminal instead of cutting it."""
    # the layout column only where a plan goes beyond data parallelism (dp4 x tp2 +sp)
    show_layout = any(e.tp > 1 or e.pp > 1 or e.cp > 1 or e.ep > 1 for e in estimates)
    rows = [GPUS, *([LAYOUT] if show_layout else []), STRATEGY]
    host = [HOST] if any(e.host_bytes is not None for e in estimates) else []
    every = [*rows, PEAK, *BREAKDOWN, FITS, MAX_BATCH, PEAK_IN, *host]
    narrow = _table(estimates, every, narrow=True)
    return [
        TableLayout((_table(estimates, every, narrow=False),)),
        TableLayout((narrow,)),
        TableLayout((_table(estimates, [c for c in every if c is not PEAK_IN], narrow=True),),
                    note=f"peak in (the phase of each peak) needs {natural_width(console, narrow)} columns; "
                         "--json and --html have it"),
        TableLayout((_table(estimates, [*rows, PEAK, FITS, MAX_BATCH], narrow=True),
                     _table(estimates, [*rows, *BREAKDOWN, PEAK_IN, *host], narrow=True))),
        TableLayout((_table(estimates, [*rows, PEAK, FITS, MAX_BATCH], narrow=True, fold=True),
                     _table(estimates, [*rows, *BREAKDOWN, PEAK_IN, *host], narrow=True, fold=True))),
    ]


def _table(estimates: list[StrategyEstimate], columns: list[EstimateColumn], *, narrow: bool,
           fold: bool = False) -> Table:
    """One table of ``columns``, a section per GPU count. ``narrow``: two-line headers and two
    spaces between columns instead of three; ``fold``: a cell wider than its column continues
    on the next line (rich would end it with an ellipsis)."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=narrow)
    for column in columns:
        table.add_column(column.narrow_header if narrow else column.header, justify=column.justify,
                         overflow="fold" if fold else "ellipsis")
    previous_gpus = None
    for e in estimates:
        if previous_gpus is not None and e.gpus != previous_gpus:
            table.add_section()
        previous_gpus = e.gpus
        table.add_row(*(column.cell(e) for column in columns))
    return table


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
