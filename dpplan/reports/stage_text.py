"""A plan's pipeline in words, shared by the terminal table and the HTML report: the run's
pipeline (``pipeline parallel 4 (1f1b, 8 micro-batches)``) and, per estimate with stages, its
heaviest and lightest pipeline rank and how many micro-batches each holds.

The numbers are the planner's (planner/plan.py ``StageEstimate``); here they are only picked
(the largest and smallest peak) and printed.
"""

from __future__ import annotations

from dpplan.config import RunSpec
from dpplan.planner.plan import StageEstimate, StrategyEstimate
from dpplan.reports.units import format_bytes

IN_FLIGHT_MEANING = "in flight: micro-batches whose activations pp rank 0, 1, ... hold at once"
"""What the ``in flight 4/3/2/1`` of a stage line counts, said once above the lines."""


def pipeline_text(run: RunSpec) -> str:
    """``pipeline parallel 4 (1f1b, 8 micro-batches)``; "" without a pipeline. With pp > 1
    the step's micro-batches are its gradient accumulation (config.RunSpec ``pp``)."""
    if run.pp == 1:
        return ""
    micro_batches = f"{run.grad_accum} micro-batch" + ("es" if run.grad_accum != 1 else "")
    return f"pipeline parallel {run.pp} ({run.pp_schedule}, {micro_batches})"


def owns_text(stage: StageEstimate) -> str:
    """``embedding, layers 0-1``; a rank of two stages (interleaved and V schedules) says which
    first: ``stages 0, 7: embedding, layers 0-1, layers 14-15, head``."""
    owns = ", ".join(stage.owns) or "nothing"
    if len(stage.stages) > 1:
        return f"stages {', '.join(map(str, stage.stages))}: {owns}"
    return owns


def heaviest_stage(estimate: StrategyEstimate) -> StageEstimate:
    """The pipeline rank whose peak is the estimate's (the first of those tied)."""
    return max(estimate.stages, key=lambda s: s.peak_bytes)


def lightest_stage(estimate: StrategyEstimate) -> StageEstimate:
    return min(estimate.stages, key=lambda s: s.peak_bytes)


def in_flight_text(estimate: StrategyEstimate) -> str:
    """``4/3/2/1``: each pipeline rank's micro-batches in flight, in pipeline order."""
    return "/".join(str(s.in_flight) for s in estimate.stages)


def stage_parts(estimate: StrategyEstimate) -> list[str]:
    """One estimate's stages as the parts of a line, each to be kept whole when a line is broken:
    ``ddp on 8 GPUs: heaviest pp rank 0 12.30 GiB (embedding, layers 0-1)``, ``lightest pp rank 3
    9.10 GiB``, ``in flight 4/3/2/1``. Empty without stages."""
    if not estimate.stages:
        return []
    heaviest, lightest = heaviest_stage(estimate), lightest_stage(estimate)
    gpus = f"{estimate.gpus} GPU" + ("s" if estimate.gpus != 1 else "")
    if heaviest.peak_bytes == lightest.peak_bytes:  # no rank to name as the heaviest
        return [f"{estimate.strategy} on {gpus}: every pp rank {format_bytes(heaviest.peak_bytes)}",
                f"in flight {in_flight_text(estimate)}"]
    return [
        f"{estimate.strategy} on {gpus}: heaviest pp rank {heaviest.pp_rank} {format_bytes(heaviest.peak_bytes)} "
        f"({owns_text(heaviest)})",
        f"lightest pp rank {lightest.pp_rank} {format_bytes(lightest.peak_bytes)}",
        f"in flight {in_flight_text(estimate)}",
    ]


def pipeline_estimates(estimates: list[StrategyEstimate]) -> list[StrategyEstimate]:
    """The estimates with stages (a plan saved without them, or pp 1, has none)."""
    return [e for e in estimates if e.stages]
