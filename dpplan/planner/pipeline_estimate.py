"""Plans with pipeline parallelism: one trace per pipeline rank (its stages under torch's
schedule, planner/trace/pipeline_rank.py), each replayed by the data-parallel strategy over
its dp ranks like any trace, and the plan is the heaviest rank's, with every rank kept in
``stages``. Ranks are never averaged: stage 0 holds the embedding and, under 1F1B, the most
micro-batches; the last stage the head and the loss's logits (Megatron-Bridge PR #5077 and
zero-bubble#8 are the known failures of planning one average stage)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from dpplan.config import PlanConfig
from dpplan.planner import forked
from dpplan.planner.plan import StageEstimate, StrategyEstimate
from dpplan.planner.trace import StepTrace, TraceSettings


def pipeline_traces(
    settings: TraceSettings, pp: int, trace: Callable[[TraceSettings], StepTrace], cache: dict, *,
    fork: bool = False,
) -> list[StepTrace]:
    """The trace of every pipeline rank under ``settings`` (traced once per plan). With
    ``fork`` the ranks not traced yet are shared with a forked child on another core, each
    taken by whichever process is free first (planner/forked.py); the traces are the same."""
    ranked = [replace(settings, pp_rank=rank) for rank in range(pp)]
    missing = [s for s in ranked if s not in cache]
    if fork and len(missing) >= 2 and forked.can_fork():
        cache.update(_trace_in_two_processes(missing, trace))
    for s in ranked:
        if s not in cache:
            cache[s] = trace(s)
    return [cache[s] for s in ranked]


def _trace_in_two_processes(
    missing: list[TraceSettings], trace: Callable[[TraceSettings], StepTrace]
) -> dict[TraceSettings, StepTrace]:
    queue = forked.WorkQueue(len(missing))

    def work() -> dict[TraceSettings, StepTrace]:
        done = {}
        while (index := queue.take()) is not None:
            done[missing[index]] = trace(missing[index])
        return done

    try:
        child = forked.start(work)
    except OSError:  # no process to be had: everything here
        queue.close()
        return {}
    try:
        mine = work()
        return {**mine, **child.result()}
    finally:
        child.cancel()
        queue.close()


def estimate_pipeline(
    traces: list[StepTrace], strategy: str, gpus: int, config: PlanConfig,
    estimate_rank: Callable[[StepTrace, str, int, PlanConfig], StrategyEstimate],
) -> StrategyEstimate:
    """``strategy`` on ``gpus`` with ``len(traces)`` pipeline ranks: each rank's estimate by
    ``estimate_rank`` (estimate.py's ``estimate_strategy``, which plans its dp x tp ranks), the
    heaviest as the plan, every one in ``stages``."""
    from dpplan.training.pipeline_layout import PipelineLayout
    from dpplan.training.pipeline_parallel import in_flight_micro_batches

    layout = PipelineLayout(pp=config.run.pp, schedule=config.run.pp_schedule,
                            num_micro_batches=config.run.grad_accum)
    in_flight = in_flight_micro_batches(layout)
    per_rank = [estimate_rank(trace, strategy, gpus, config) for trace in traces]
    stages = [
        StageEstimate(
            pp_rank=rank, stages=list(trace.pipeline_stages), owns=list(trace.pipeline_owns),
            num_params=sum(p.numel for p in trace.params), in_flight=in_flight[rank],
            peak_bytes=estimate.peak_bytes, breakdown=estimate.breakdown, peak_phase=estimate.peak_phase,
            fits=estimate.fits, max_batch_size=estimate.max_batch_size,
        )
        for rank, (trace, estimate) in enumerate(zip(traces, per_rank))
    ]
    heaviest = max(range(len(per_rank)), key=lambda r: per_rank[r].peak_bytes)
    ranks_per_stage = gpus // config.run.pp  # pp is the outermost mesh axis
    notes: list[str] = []
    for estimate in per_rank:
        notes += [n for n in estimate.notes if n not in notes]
    notes.append(f"pipeline: {config.run.pp} ranks, {config.run.pp_schedule}, {config.run.grad_accum} micro-batches "
                 f"of {config.run.batch_size}; the plan is the heaviest pipeline rank's (pp rank {heaviest})")
    chosen = per_rank[heaviest]
    return replace(
        chosen,
        peak_rank=heaviest * ranks_per_stage + chosen.peak_rank,
        fits=all(e.fits for e in per_rank),
        max_batch_size=min(e.max_batch_size for e in per_rank),
        notes=notes,
        pp_schedule=config.run.pp_schedule,
        stages=stages,
    )
