"""The plan page's pipeline section: every pipeline rank of each estimate with pipeline
parallelism, as stacked bars of what holds its memory and as a table.

An estimate's bar in "Where the memory goes" is its heaviest pipeline rank; here each rank has
its own (planner/plan.py ``StageEstimate``), so a first rank heavy with the embedding and the
most micro-batches in flight shows beside the lighter ones. Nothing is computed beyond units.
"""

from __future__ import annotations

import plotly.graph_objects as go

from dpplan.planner.plan import StageEstimate, StrategyEstimate
from dpplan.reports.html_page import (
    CATEGORY_COLORS,
    CATEGORY_LABELS,
    Callout,
    Figure,
    Section,
    Table,
    figure_text,
    stack_per_gpu_bars,
    style_figure,
)
from dpplan.reports.stage_text import IN_FLIGHT_MEANING, owns_text, pipeline_estimates, stage_parts
from dpplan.reports.terminal_width import PART_SEPARATOR
from dpplan.reports.units import GiB, format_count


def estimate_name(estimate: StrategyEstimate) -> str:
    """``ddp on 8 GPUs``: the group of an estimate's ranks in the figure and the table."""
    return f"{estimate.strategy} on {estimate.gpus} GPU" + ("s" if estimate.gpus != 1 else "")


def _rank_name(stage: StageEstimate) -> str:
    return f"pp rank {stage.pp_rank}"


def _stage_bars(pipelines: list[StrategyEstimate], capacity_name: str) -> Figure:
    """A stacked bar per pipeline rank, grouped by estimate, with the capacity across."""
    ranks = [(e, s) for e in pipelines for s in e.stages]
    x = [[estimate_name(e) for e, _ in ranks], [_rank_name(s) for _, s in ranks]]
    # hover: what the rank holds and its micro-batches in flight (names escaped for plotly)
    held = [[figure_text(owns_text(s)), s.in_flight] for _, s in ranks]
    figure = go.Figure()
    for key, label in CATEGORY_LABELS.items():
        figure.add_bar(
            x=x, y=[s.breakdown[key] / GiB for _, s in ranks], name=label, marker_color=CATEGORY_COLORS[key],
            customdata=held,
            hovertemplate="%{x}: %{customdata[0]}<br>" + figure_text(label)
            + ": %{y:.2f} GiB<br>%{customdata[1]} micro-batches in flight<extra></extra>",
        )
    stack_per_gpu_bars(figure, pipelines, capacity_name)
    return Figure(
        name="pipeline-stages",
        figure=style_figure(figure, height=480),
        caption="Per-GPU memory at each pipeline rank's own peak, split by what holds it, for every plan with "
        "pipeline parallelism; the heaviest rank is the plan's peak in the charts above. "
        f"The dashed line is the {capacity_name}, the dotted one what a plan may use of it (less the headroom). "
        "GiB = 2^30 bytes.",
    )


def _stage_table(pipelines: list[StrategyEstimate]) -> Table:
    headers = ["GPUs", "strategy", "pp rank", "holds", "parameters", "in flight", "peak GiB", "params", "grads", "optim",
               "activ", "other", "fits", "max batch", "peak in"]
    rows, css = [], []
    for e in pipelines:
        for s in e.stages:
            rows.append([str(e.gpus), e.strategy, str(s.pp_rank), owns_text(s), format_count(s.num_params),
                         str(s.in_flight), f"{s.peak_bytes / GiB:.2f}",
                         *(f"{s.breakdown[k] / GiB:.2f}" for k in CATEGORY_LABELS), "yes" if s.fits else "no",
                         str(s.max_batch_size), s.peak_phase or "-"])
            css.append("" if s.fits else "bad")
    return Table(headers=headers, rows=rows, numeric=frozenset({0, 2, 4, 5, 6, 7, 8, 9, 10, 11, 13}), row_css=css)


def stage_section(estimates: list[StrategyEstimate], capacity_name: str) -> Section | None:
    """The section, or None when no estimate has stages (no pipeline, or a plan saved before)."""
    pipelines = pipeline_estimates(estimates)
    if not pipelines:
        return None
    return Section(title="Pipeline stages", anchor="stages", blocks=[
        Callout(lines=[PART_SEPARATOR.join(stage_parts(e)) for e in pipelines] + [IN_FLIGHT_MEANING + "."]),
        _stage_bars(pipelines, capacity_name),
        _stage_table(pipelines),
    ])
