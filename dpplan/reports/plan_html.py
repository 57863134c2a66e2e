"""The estimate report: what fits, where the memory goes, and the largest micro-batch.

Draws a ``PlanDocument`` (planner/plan.py), the plan JSON as it was written and read back, so
``dpplan report plan.json`` and ``dpplan estimate --html`` give the same page; no number is
computed here beyond unit conversion and picking from the estimates.
"""

from __future__ import annotations

import plotly.graph_objects as go

from dpplan.planner.hardware import GPU_CATALOG
from dpplan.planner.plan import ModelSummary, Plan, PlanDocument, StrategyEstimate
from dpplan.reports.html_page import (
    CATEGORY_COLORS,
    CATEGORY_LABELS,
    BulletList,
    Callout,
    Figure,
    Page,
    Section,
    Table,
    Text,
    byte_unit,
    figure_text,
    line_style,
    stack_per_gpu_bars,
    style_figure,
)
from dpplan.reports.plan_recommendation import headroom_text, nodes_text, recommendation_line
from dpplan.reports.plan_table import activation_trace_owner, merged_notes
from dpplan.reports.stage_html import stage_section
from dpplan.reports.stage_text import pipeline_text
from dpplan.reports.units import GiB, format_bytes, format_count

CHECKPOINTING = {"none": "off", "model": "on (the model's own)", "units": "on (per unit)"}
# Fill of the "what fits" map: share of the GPU's memory. Past 100% the cell turns red.
FIT_COLORSCALE = [[0.0, "#e8f5ec"], [0.45, "#9fd4b0"], [0.66, "#f3d27a"], [0.6667, "#e4574b"], [1.0, "#8e1b12"]]
FIT_MAX_PCT = 150.0


def _gpu_label(gpus: int) -> str:
    return f"{gpus} GPU" + ("s" if gpus != 1 else "")


def _target(document: PlanDocument) -> str:
    config = document.plan.config
    if config.device == "cpu":
        return "CPU ranks (gloo): live tensor bytes; capacity = host RAM per rank"
    spec = GPU_CATALOG.get(config.gpu)
    if spec is None:
        return config.gpu
    return f"{spec.description} ({format_bytes(spec.memory_bytes)})"


def _capacity_name(document: PlanDocument) -> str:
    return "host RAM per rank" if document.plan.config.device == "cpu" else "GPU memory"


def _memory_bars(estimates: list[StrategyEstimate], capacity_name: str) -> Figure:
    """Stacked per-GPU memory of each strategy, grouped by GPU count, with the capacity across."""
    layouts = _shows_layout(estimates)
    x = [[_gpu_label(e.gpus) + (f" ({e.layout})" if layouts else "") for e in estimates], [e.strategy for e in estimates]]
    figure = go.Figure()
    for key, label in CATEGORY_LABELS.items():
        figure.add_bar(
            x=x,
            y=[e.breakdown[key] / GiB for e in estimates],
            name=label,
            marker_color=CATEGORY_COLORS[key],
            hovertemplate="%{x}<br>" + figure_text(label) + ": %{y:.2f} GiB<extra></extra>",
        )
    stack_per_gpu_bars(figure, estimates, capacity_name)
    return Figure(
        name="memory-by-strategy",
        figure=style_figure(figure, height=480),
        caption="Per-GPU memory at the peak of the most loaded rank, split by what holds it. "
        f"The dashed line is the {capacity_name}, the dotted one what a plan may use of it (less the headroom). "
        "GiB = 2^30 bytes.",
    )


def _fit_map(estimates: list[StrategyEstimate], strategies: list[str], gpu_counts: list[int],
             capacity_name: str) -> Figure:
    """Strategy x GPU count: the peak as a share of the GPU; red where it does not fit."""
    by_cell = {(e.strategy, e.gpus): e for e in estimates}
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    hover: list[list[str]] = []
    for strategy in strategies:
        row_z: list[float | None] = []
        row_text: list[str] = []
        row_hover: list[str] = []
        for gpus in gpu_counts:
            e = by_cell.get((strategy, gpus))
            if e is None or not e.capacity_bytes:
                row_z.append(None)
                row_text.append("")
                row_hover.append("not planned")
                continue
            share = 100.0 * e.peak_bytes / e.capacity_bytes
            row_z.append(min(share, FIT_MAX_PCT))
            mark = "" if e.fits else "✗ "
            row_text.append(f"{mark}{e.peak_bytes / GiB:.1f}")
            row_hover.append(
                f"{strategy} on {_gpu_label(gpus)}: {format_bytes(e.peak_bytes)} "
                f"({share:.0f}% of the {capacity_name}), {'fits' if e.fits else 'does not fit'}, "
                f"largest micro-batch {e.max_batch_size}"
            )
        z.append(row_z)
        text.append(row_text)
        hover.append(row_hover)
    figure = go.Figure(go.Heatmap(
        z=z, x=[_gpu_label(g) for g in gpu_counts], y=strategies, text=text, texttemplate="%{text}",
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", zmin=0, zmax=FIT_MAX_PCT,
        colorscale=FIT_COLORSCALE, xgap=2, ygap=2,
        colorbar={"title": {"text": "% of " + ("GPU" if capacity_name == "GPU memory" else "RAM")}, "ticksuffix": "%"},
    ))
    figure.update_yaxes(autorange="reversed")
    return Figure(
        name="fit-map",
        figure=style_figure(figure, height=max(260, 36 * len(strategies) + 90)),
        caption="Peak GiB per GPU of each strategy (rows) at each GPU count (columns); the colour is the "
        f"share of the {capacity_name}, red from 100%. ✗ marks a plan that does not fit: its peak is above "
        "the memory less the headroom.",
    )


def _max_batch_lines(estimates: list[StrategyEstimate], strategies: list[str],
                     gpu_counts: list[int]) -> Figure | Callout:
    # A strategy that fits at no GPU count would be a line along zero under the others: named instead.
    never = [s for s in strategies if not any(e.max_batch_size for e in estimates if e.strategy == s)]
    if len(never) == len(strategies):
        return Callout(lines=["No strategy fits even micro-batch 1 at any GPU count planned."], css="bad")
    # Strategies whose lines are the same at every GPU count (fsdp-full and fsdp-hybrid on one
    # node) are one line, named for all of them: drawn apart, the last would hide the others.
    lines: dict[tuple, list[str]] = {}
    for strategy in [s for s in strategies if s not in never]:
        points = tuple((_gpu_label(e.gpus), e.max_batch_size) for e in estimates if e.strategy == strategy)
        lines.setdefault(points, []).append(strategy)
    figure = go.Figure()
    for index, (points, named) in enumerate(lines.items()):
        name = " = ".join(named)
        figure.add_scatter(
            x=[gpus for gpus, _ in points], y=[batch for _, batch in points],
            mode="lines+markers", name=name, **line_style(index),
            hovertemplate=figure_text(name) + " on %{x}: micro-batch %{y}<extra></extra>",
        )
    figure.update_layout(yaxis_title="largest micro-batch per GPU", xaxis_title="GPUs")
    figure.update_xaxes(type="category", categoryorder="array", categoryarray=[_gpu_label(g) for g in gpu_counts])
    figure.update_yaxes(rangemode="tozero")
    caption = ("The largest micro-batch per GPU (rank) that fits, per strategy, as the GPU count grows "
               "(0: not even micro-batch 1 fits); strategies with the same line are one entry (a = b).")
    if never:
        caption += f" Not drawn, since micro-batch 1 fits at no GPU count planned: {', '.join(never)}."
    return Figure(name="max-batch", figure=style_figure(figure), caption=caption)


def _activation_modules(plan: Plan) -> Figure | None:
    modules = plan.model.top_activation_modules
    if not modules:
        return None
    labels = [f"{figure_text(m.name)} ({figure_text(m.class_name)})" for m in modules]
    unit, size = byte_unit(max(m.activation_bytes for m in modules))
    figure = go.Figure(go.Bar(
        x=[m.activation_bytes / size for m in modules], y=labels, orientation="h",
        marker_color=CATEGORY_COLORS["activations"],
        hovertemplate="%{y}: %{x:.2f} " + unit + "<extra></extra>",
    ))
    figure.update_yaxes(autorange="reversed", automargin=True)
    figure.update_layout(xaxis_title=f"activation memory kept for backward ({unit} per micro-batch)")
    return Figure(
        name="activation-modules",
        figure=style_figure(figure, height=max(240, 28 * len(modules) + 110)),
        caption=f"Bytes each module's forward keeps for backward, per micro-batch, on one rank of "
        f"{activation_trace_owner(plan)}: the step traced for the first strategy planned (under mixed precision "
        "strategies that cast parameters, FSDP and ZeRO, keep other bytes than autocast's single, dp and ddp). "
        "A parent's bytes are those its own operations keep (children are listed apart).",
    )


def _assumptions(document: PlanDocument) -> Table:
    config, model = document.plan.config, document.plan.model
    run = config.run
    checkpointing = _checkpointing(document)
    units = model.unit_names
    rows = [
        ["model", f"{model.name} ({model.path})"],
        ["parameters", f"{format_count(model.num_params)} ({format_count(model.num_trainable_params)} trainable)"],
        ["target", _target(document)],
        ["precision", run.precision],
        ["optimizer", run.optimizer],
        ["micro-batch per GPU", str(run.batch_size)],
        ["gradient accumulation", str(run.grad_accum)],
        ["activation checkpointing", checkpointing],
        ["offload", run.offload],
        *([["pipeline", pipeline_text(run)]] if run.pp > 1 else []),
        ["nodes", nodes_text(config)],
        ["headroom", headroom_text(config)],
        ["FSDP / checkpoint units", f"{len(units)}: {', '.join(units[:4])}{' …' if len(units) > 4 else ''}"
         if units else "none (root only)"],
        ["trace", _trace_text(model)],
    ]
    return Table(headers=["assumption", "value"], rows=rows)


def _checkpointing(document: PlanDocument) -> str:
    """``off``, ``on (per unit)`` or ``on (the model's own)``."""
    model = document.plan.model
    if not document.plan.config.run.activation_checkpointing:
        return "off"
    return CHECKPOINTING.get(model.checkpointing, model.checkpointing)


def _trace_text(model: ModelSummary) -> str:
    text = f"{model.num_traced_ops} ops in {model.trace_seconds:.1f} s"
    if model.repeated_layers:
        text += f"; {model.repeated_layers} alike layers traced at 3 and 4 and built to full depth"
    return text


def _shows_layout(estimates: list[StrategyEstimate]) -> bool:
    """Whether the plan goes beyond data parallelism (then its layouts are drawn)."""
    return any(e.tp > 1 or e.pp > 1 or e.cp > 1 or e.ep > 1 for e in estimates)


def _all_estimates(estimates: list[StrategyEstimate]) -> Table:
    show_host = any(e.host_bytes is not None for e in estimates)
    layout = ["layout"] if _shows_layout(estimates) else []
    headers = ["GPUs", *layout, "strategy", "peak GiB", "params", "grads", "optim", "activ", "other", "fits",
               "max batch", "peak in"] + (["host GiB/node"] if show_host else [])
    rows, css = [], []
    for e in estimates:
        b = e.breakdown
        row = [str(e.gpus), *([e.layout] if layout else []), e.strategy, f"{e.peak_bytes / GiB:.2f}",
               *(f"{b[k] / GiB:.2f}" for k in CATEGORY_LABELS), "yes" if e.fits else "no",
               str(e.max_batch_size), e.peak_phase or "-"]
        if show_host:
            row.append("-" if e.host_bytes is None else f"{e.host_bytes / GiB:.2f}")
        rows.append(row)
        css.append("" if e.fits else "bad")
    shift = len(layout)
    numeric = frozenset({0} | {i + shift for i in (2, 3, 4, 5, 6, 7, 9)} | ({11 + shift} if show_host else set()))
    return Table(headers=headers, rows=rows, numeric=numeric, row_css=css)


def _verdict(estimates: list[StrategyEstimate], gpu_counts: list[int]) -> Callout:
    """Per GPU count: how many strategies fit and the lowest peak, read off the estimates."""
    lines = []
    for gpus in gpu_counts:
        here = [e for e in estimates if e.gpus == gpus]
        fitting = [e for e in here if e.fits]
        if not fitting:
            lines.append(f"{_gpu_label(gpus)}: no strategy fits (lowest peak "
                         f"{format_bytes(min(e.peak_bytes for e in here))}).")
            continue
        lowest = min(fitting, key=lambda e: e.peak_bytes)
        largest = max(fitting, key=lambda e: e.max_batch_size)
        lines.append(
            f"{_gpu_label(gpus)}: {len(fitting)} of {len(here)} strategies fit; lowest peak {lowest.strategy} "
            f"{format_bytes(lowest.peak_bytes)}; largest micro-batch {largest.max_batch_size} "
            f"({largest.strategy})."
        )
    return Callout(lines=lines, css="" if any(e.fits for e in estimates) else "bad")


def plan_page(document: PlanDocument) -> Page:
    plan = document.plan
    estimates, config, model = plan.estimates, plan.config, plan.model
    gpu_counts = sorted({e.gpus for e in estimates})
    strategies = [s for s in config.strategies if any(e.strategy == s for e in estimates)]
    stages = stage_section(estimates, _capacity_name(document))  # None without a pipeline
    sections = [
        Section(title="What fits", anchor="fits", blocks=[
            *([Callout(lines=[recommendation_line(plan.recommendation)], css="" if plan.recommendation.fits else "bad")]
              if plan.recommendation else []),
            _verdict(estimates, gpu_counts),
            _fit_map(estimates, strategies, gpu_counts, _capacity_name(document)),
        ]),
        Section(title="Where the memory goes", anchor="breakdown", blocks=[_memory_bars(estimates, _capacity_name(document))]),
        *([stages] if stages else []),
        Section(title="Largest micro-batch", anchor="max-batch", blocks=[_max_batch_lines(estimates, strategies, gpu_counts)]),
    ]
    activations = _activation_modules(plan)
    if activations:
        sections.append(Section(title=f"Activation memory by module: {activation_trace_owner(plan)}",
                                anchor="activations", blocks=[activations]))
    notes = merged_notes(plan)
    notes += [f"not planned: {strategy}: {reason}" for strategy, reason in plan.unsupported.items()]
    sections.append(Section(title="Assumptions", anchor="assumptions", blocks=[
        _assumptions(document),
        *([Text(text="Notes:"), BulletList(items=notes)] if notes else []),
    ]))
    sections.append(Section(title="All estimates", anchor="estimates", blocks=[
        _all_estimates(estimates),
        Text(text="peak = the most loaded rank's peak per GPU; breakdown = what is live at that peak; "
             "GiB = 2^30 bytes.", css="muted"),
    ]))
    return Page(
        title="dpplan memory plan",
        model_name=model.name,
        subtitle=f"{format_count(model.num_params)} parameters · {config.run.precision} · {config.run.optimizer} · "
        f"micro-batch {config.run.batch_size} · "
        + (f"sequence {model.seq_len} ({model.tokens_per_micro_batch} tokens per micro-batch) · "
           if model.tokens_per_micro_batch is not None else "")
        + f"activation checkpointing {_checkpointing(document)} · "
        + (f"tensor parallel {config.run.tp}{' + sequence parallel' if config.run.sequence_parallel else ''} · "
           if config.run.tp > 1 else "")
        + (f"expert parallel {config.run.ep} · " if config.run.ep > 1 else "")
        + (f"{pipeline_text(config.run)} · " if config.run.pp > 1 else "")
        + (f"context parallel {config.run.cp} (by rule, not validated) · " if config.run.cp > 1 else "")
        + _target(document),
        header_rows=[
            ("created", document.created or "-"),
            ("command", document.command or "-"),
            ("model file", model.path),
        ],
        sections=sections,
        footer="estimates from a traced training step on a fake device; nothing was allocated",
    )
