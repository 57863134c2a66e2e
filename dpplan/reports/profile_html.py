"""The profile report: the recommendation first, then measured against estimated, memory over
time per rank, and speed.

Draws a ProfileDocument (profiler/profile_document.py; ``dpplan report`` reads it back from
profile.json) as written; every number, error and recommendation is computed by the profiler.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dpplan.profiler.profile_document import ProfileDocument
from dpplan.profiler.profile_results import Measured, RunResult
from dpplan.profiler.recommendation_results import Recommendations
from dpplan.reports.html_page import (
    MARKER_SYMBOLS,
    BulletList,
    Callout,
    Figure,
    Heading,
    Page,
    Section,
    Table,
    Text,
    add_level,
    byte_unit,
    figure_text,
    style_figure,
)
from dpplan.reports.recommendation_text import (
    fastest_line,
    format_pct,
    format_rate,
    offload_line,
    recommendation_line,
)
from dpplan.reports.units import format_bytes

# One colour per rank (cycled), one dash per series kind, so a rank keeps its colour.
RANK_COLORS = ("#3b6fb6", "#e08a2c", "#5a9e4b", "#c4473a", "#8c7bb8", "#7a5c3e", "#d16ba5", "#6b7280")
LINE_DASH = {"allocated": "solid", "reserved": "dot", "nvml_used": "dash"}
MAX_RANKS_DRAWN = 8
"""Ranks drawn per run in the memory-over-time figure; the rest are in the JSON."""
FIRST_RANK_LINE_WIDTH, RANK_LINE_WIDTH_STEP, MIN_LINE_WIDTH = 4.0, 1.25, 1.0
"""Line widths in pixels: rank 0's widest, each next rank's thinner, so coinciding ranks show as
one line of several colours."""
MARKERS_PER_LINE = 24
"""Markers drawn per line (plotly's marker.maxdisplayed): enough to tell the ranks apart, few
enough not to hide the line."""


NOT_MEASURED = Measured(summarized=False)
"""What a run that measured nothing (skipped) reads as."""


def _is_cuda(document: ProfileDocument) -> bool:
    return document.device.type == "cuda"


def _estimated_allocated(document: ProfileDocument, run: RunResult) -> int | None:
    """The estimate comparable to "allocated": tensor bytes on cpu, allocator bytes on cuda."""
    if run.estimate is None:
        return None
    return run.estimate.peak_allocated_bytes if _is_cuda(document) else run.estimate.peak_bytes


def _recommendation_blocks(document: ProfileDocument) -> list:
    section = document.recommendations
    if not section:
        if document.interrupted:
            return [Callout(lines=["Interrupted before the recommendations were made; the runs below are kept."],
                            css="bad")]
        return [Text(text="No recommendation was made for this profile.", css="muted")]
    lines = []
    fastest = section.fastest
    if fastest:
        lines.append(f"Recommended: {fastest_line(fastest)}.")
        chosen = next((rec for rec in section.strategies if rec.strategy == fastest.strategy), None)
        if chosen and chosen.batch_size:
            lines.append(recommendation_line(chosen, section))
    else:
        lines.append("No strategy both fits and was measured; see each strategy below.")
    blocks = [
        Callout(lines=lines, css="" if fastest else "bad"),
        Text(text=f"Capacity {format_bytes(section.capacity_bytes)} per rank ({section.capacity_source}); "
             f"headroom {section.headroom_pct:g}%: a micro-batch is recommended only if its peak stays under "
             f"{format_bytes(section.limit_bytes)}."),
    ]
    reasons = []
    for rec in section.strategies:
        reasons.append(recommendation_line(rec, section))
        offload = offload_line(rec, section)
        if offload:
            reasons.append(offload)
        trials = rec.search.trials if rec.search else ()
        if trials:
            reasons.append(f"{rec.strategy} trials: " + ", ".join(
                f"batch {t.batch_size} {t.status.replace('_', ' ')}"
                + (f" ({format_bytes(t.peak_bytes)})" if t.peak_bytes is not None else "")
                for t in trials
            ))
    blocks.append(BulletList(items=reasons))
    if section.notes:
        blocks.append(BulletList(items=[f"note: {note}" for note in section.notes], css="warn"))
    search = _batch_search(section)
    if search:
        blocks.append(search)
    return blocks


def _estimate_vs_measured(document: ProfileDocument, runs: tuple[RunResult, ...]) -> Figure:
    measured_runs = [r for r in runs if r.status == "ok"]
    names = [figure_text(r.settings.strategy) for r in measured_runs]
    estimated = [_estimated_allocated(document, r) for r in measured_runs]
    measured = [(r.measured or NOT_MEASURED).peak_allocated_bytes for r in measured_runs]
    quantity = "allocated (torch)" if _is_cuda(document) else "tensor bytes (exact)"
    nvml = [(r.measured or NOT_MEASURED).peak_nvml_bytes for r in measured_runs] if _is_cuda(document) else []
    unit, size = byte_unit(max((v for v in measured + estimated + nvml if v is not None), default=None))

    def scaled(values):
        return [None if v is None else v / size for v in values]

    figure = go.Figure()
    figure.add_bar(x=names, y=scaled(measured), name=f"measured {quantity}", marker_color="#3b6fb6",
                   hovertemplate="%{x} measured: %{y:.2f} " + unit + "<extra></extra>")
    figure.add_bar(x=names, y=scaled(estimated), name="estimated", marker_color="#b7c7e4",
                   hovertemplate="%{x} estimated: %{y:.2f} " + unit + "<extra></extra>")
    for name, run, top in zip(names, measured_runs, measured):
        figure.add_annotation(x=name, y=(top or 0) / size, text=f"error {format_pct(run.error_pct)}",
                              showarrow=False, yshift=12)
    if any(v is not None for v in nvml):
        figure.add_scatter(x=names, y=scaled(nvml), mode="markers",
                           marker={"symbol": "diamond", "size": 11, "color": "#c4473a"},
                           name="measured NVML used (whole device)")
    figure.update_layout(barmode="group", yaxis_title=f"peak per rank ({unit})")
    return Figure(
        name="estimate-vs-measured",
        figure=style_figure(figure),
        caption="The largest per-rank peak over the timed steps against `dpplan estimate` for the same run; "
        "error = (estimate - measured) / measured. KiB, MiB, GiB = 2^10, 2^20, 2^30 bytes.",
    )


def _memory_over_time(document: ProfileDocument, run: RunResult, index: int) -> Figure | None:
    per_rank = [r for r in (run.measured or NOT_MEASURED).per_rank if r.get("memory_series")]
    if not per_rank:
        return None
    figure = go.Figure()
    first = per_rank[0]["memory_series"]
    estimated = _estimated_allocated(document, run)
    device_peak = run.estimate.peak_bytes if run.estimate else None
    largest = max([estimated or 0, device_peak or 0] + [
        max(line["bytes"], default=0) for r in per_rank for line in r["memory_series"]["lines"].values()])
    unit, size = byte_unit(largest)
    for position, rank_detail in enumerate(per_rank[:MAX_RANKS_DRAWN]):
        series = rank_detail["memory_series"]
        color = RANK_COLORS[rank_detail["rank"] % len(RANK_COLORS)]
        # Ranks of a data-parallel run often allocate alike, to the byte: each later rank is
        # drawn thinner over the one before, with a marker of its own, so that all stay visible.
        width = max(MIN_LINE_WIDTH, FIRST_RANK_LINE_WIDTH - RANK_LINE_WIDTH_STEP * position)
        for name, line in series["lines"].items():
            figure.add_scatter(
                x=line["time_s"], y=[b / size for b in line["bytes"]], mode="lines+markers",
                name=f"rank {rank_detail['rank']} {figure_text(line['label'])}",
                line={"color": color, "dash": LINE_DASH.get(name, "solid"), "width": width},
                marker={"symbol": MARKER_SYMBOLS[position % len(MARKER_SYMBOLS)], "size": 7, "color": color,
                        "maxdisplayed": MARKERS_PER_LINE},
                hovertemplate="%{x:.3f} s: %{y:.2f} " + unit + "<extra>rank " + str(rank_detail["rank"]) + "</extra>",
            )
    warmup = first["warmup_steps"]
    if 0 < warmup < len(first["step_starts_s"]):
        figure.add_vrect(x0=0, x1=first["step_starts_s"][warmup], fillcolor="#9aa5b1", opacity=0.15, line_width=0,
                         annotation_text="warm-up", annotation_position="top left")
    for start in first["step_starts_s"][1:]:
        figure.add_vline(x=start, line_color="#9aa5b1", line_width=1)
    if estimated:
        figure.add_hline(y=estimated / size, line_dash="dash", line_color="#b42318",
                         annotation_text=f"estimated peak {format_bytes(estimated)}", annotation_position="top right")
    if _is_cuda(document) and device_peak:
        figure.add_hline(y=device_peak / size, line_dash="dot", line_color="#8e1b12",
                         annotation_text=f"estimated device peak {format_bytes(device_peak)}",
                         annotation_position="bottom right")
    figure.update_layout(xaxis_title=f"seconds from the {first['time_origin']}", yaxis_title=f"{unit} per rank")
    figure.update_yaxes(rangemode="tozero")
    drawn = min(len(per_rank), MAX_RANKS_DRAWN)
    more = f" ({drawn} of {len(per_rank)} ranks drawn)" if len(per_rank) > drawn else ""
    return Figure(
        name=f"memory-over-time-{index}",
        figure=style_figure(figure, height=400),
        caption=f"{run.settings.strategy}: memory of each rank over the run{more}; grey lines start each step. "
        "Each line keeps every step's highest and lowest reading.",
    )


def _speed(runs: tuple[RunResult, ...]) -> Figure | None:
    measured_runs = [(r.settings.strategy, step, r.measured.samples_per_s) for r in runs
                     if r.status == "ok" and r.measured and (step := r.measured.step_time_s)]
    if not measured_runs:
        return None
    names = [figure_text(strategy) for strategy, _, _ in measured_runs]
    figure = make_subplots(rows=1, cols=2, subplot_titles=("step time (ms)", "samples / s (all ranks)"))
    figure.add_bar(x=names, y=[1000 * step for _, step, _ in measured_runs], row=1, col=1,
                   marker_color="#5a9e4b", showlegend=False, hovertemplate="%{x}: %{y:.1f} ms<extra></extra>")
    figure.add_bar(x=names, y=[samples_per_s for _, _, samples_per_s in measured_runs], row=1, col=2,
                   marker_color="#3b6fb6", showlegend=False, hovertemplate="%{x}: %{y:.2f} samples/s<extra></extra>")
    return Figure(
        name="speed",
        figure=style_figure(figure, height=340),
        caption="Median timed step of the slowest rank, and samples per second over all ranks.",
    )


TRIAL_MARKERS = {
    "ok": ("circle", "#1e7f4f"),
    "over_limit": ("triangle-up", "#a15c00"),
    "oom": ("x", "#b42318"),
    "failed": ("x-open", "#b42318"),
}


def _batch_search(section: Recommendations) -> Figure | None:
    """--find-batch-size: each trial's micro-batch and peak against the limit, the choice circled."""
    searched = [(rec, rec.search.trials) for rec in section.strategies if rec.search and rec.search.trials]
    if not searched:
        return None
    limit = section.limit_bytes
    largest = max([limit] + [t.peak_bytes or 0 for _, trials in searched for t in trials])
    unit, size = byte_unit(largest)
    figure = go.Figure()
    for status, (symbol, color) in TRIAL_MARKERS.items():
        found = [(rec.strategy, t) for rec, trials in searched for t in trials if t.status == status]
        if not found:
            continue
        # A trial without a peak (OOM before any step, a failed rank) sits on the limit line.
        figure.add_scatter(
            x=[t.batch_size for _, t in found],
            y=[(t.peak_bytes if t.peak_bytes is not None else limit) / size for _, t in found],
            mode="markers+text", text=[figure_text(strategy) for strategy, _ in found], textposition="top center",
            marker={"symbol": symbol, "size": 11, "color": color}, name=status.replace("_", " "),
            hovertemplate="%{text} at micro-batch %{x}: %{y:.2f} " + unit + "<extra>" + status + "</extra>",
        )
    chosen = [(rec.batch_size, peak) for rec, _ in searched
              if rec.status == "confirmed" and (peak := rec.peak_bytes) is not None]
    if chosen:
        figure.add_scatter(
            x=[batch for batch, _ in chosen], y=[peak / size for _, peak in chosen], mode="markers",
            marker={"symbol": "circle-open", "size": 22, "line": {"width": 2, "color": "#1f2933"}},
            name="recommended", hoverinfo="skip",
        )
    add_level(figure, limit / size, f"limit {format_bytes(limit)}<br>({section.headroom_pct:g}% headroom)")
    figure.update_layout(xaxis_title="micro-batch per rank", yaxis_title=f"peak per rank ({unit})")
    figure.update_xaxes(type="log", dtick=0.30102999566)  # log2 spacing: ticks at 1, 2, 4, 8, ...
    figure.update_yaxes(rangemode="tozero")
    return Figure(
        name="batch-search",
        figure=style_figure(figure, height=380),
        caption="Each trial run of the batch-size search: its micro-batch and the peak it reached, against "
        "the limit; circled, the micro-batch recommended.",
    )


def _runs_table(document: ProfileDocument, runs: tuple[RunResult, ...]) -> Table:
    cuda = _is_cuda(document)
    headers = ["strategy", "status", "measured peak", "estimated peak", "error"]
    headers += ["reserved", "NVML used"] if cuda else ["peak RSS"]
    headers += ["step ms", "samples/s", "tokens/s", "detail"]
    rows, css = [], []
    for run in runs:
        measured = run.measured or NOT_MEASURED
        step = measured.step_time_s
        row = [run.settings.strategy, str(run.status), format_bytes(measured.peak_allocated_bytes),
               format_bytes(_estimated_allocated(document, run)), format_pct(run.error_pct)]
        if cuda:
            row += [format_bytes(measured.peak_reserved_bytes), format_bytes(measured.peak_nvml_bytes)]
        else:
            row.append(format_bytes(measured.peak_rss_bytes))
        row += ["-" if step is None else f"{1000 * step:.1f}", format_rate(measured.samples_per_s),
                format_rate(measured.tokens_per_s), run.error or ""]
        rows.append(row)
        css.append({"ok": "", "skipped": "muted"}.get(run.status, "bad"))
    numeric = frozenset(range(2, len(headers) - 1))
    return Table(headers=headers, rows=rows, numeric=numeric, row_css=css)


def _settings(document: ProfileDocument) -> Table:
    config = document.config
    rows = [
        ["device", document.device.description],
        ["strategies", ", ".join(config["strategies"])],
        ["micro-batch per rank", str(config["batch_size"])],
        ["gradient accumulation", str(config["grad_accum"])],
        ["precision", config["precision"]],
        ["optimizer", config["optimizer"]],
        ["activation checkpointing", "on" if config["activation_checkpointing"] else "off"],
        ["offload", config["offload"]],
        ["steps", f"{config['warmup_steps']} warm-up + {config['steps']} timed"],
        ["results", f"{document.out_dir}/profile.json"],
    ]
    return Table(headers=["setting", "value"], rows=rows)


def profile_page(document: ProfileDocument) -> Page:
    runs, model, config = document.runs, document.model, document.config
    sections = [Section(title="Recommendation", anchor="recommendation", blocks=_recommendation_blocks(document))]
    notices = list(document.notices)
    notes = []
    for run in runs:
        for note in run.notes:
            if note not in notes:
                notes.append(note)
    if notices or notes:
        sections.append(Section(title="Notices", anchor="notices", blocks=[BulletList(items=notices + notes, css="warn")]))
    comparison = [Heading(text="Runs"), _runs_table(document, runs)]
    if any(r.status == "ok" for r in runs):
        comparison.insert(0, _estimate_vs_measured(document, runs))
    sections.append(Section(title="Estimated vs measured", anchor="accuracy", blocks=comparison))
    memory_blocks = []
    for index, run in enumerate(runs):
        figure = _memory_over_time(document, run, index)
        if figure:
            memory_blocks += [Heading(text=run.settings.strategy), figure]
    if memory_blocks:
        if not _is_cuda(document):
            memory_blocks.insert(0, Text(text="CPU ranks: the exact bytes of live CPU tensors, every allocation "
                                              "and free recorded.", css="muted"))
        sections.append(Section(title="Memory over time", anchor="memory", blocks=memory_blocks))
    speed = _speed(runs)
    if speed:
        sections.append(Section(title="Speed", anchor="speed", blocks=[speed]))
    sections.append(Section(title="Settings", anchor="settings", blocks=[_settings(document)]))
    name = (model.name if model else None) or (config.get("model") or "bundled model")
    return Page(
        title="dpplan profile",
        model_name=name,
        subtitle=f"{document.device.description} · {config['precision']} · {config['optimizer']} · "
        f"micro-batch {config['batch_size']} per rank · "
        + (f"sequence {model.seq_len} · " if model and model.seq_len else "")
        + f"activation checkpointing {'on' if config['activation_checkpointing'] else 'off'}",
        header_rows=[
            ("created", document.created or "-"),
            ("command", document.command or "-"),
            ("model file", (model.path if model else None) or config.get("model") or "bundled model"),
        ],
        sections=sections,
        footer="measured in real training runs launched through torchrun",
    )
