"""Recommendations from a profile: per strategy the largest micro-batch that fits with a stated
headroom, whether offload is needed, and the fastest strategy that fits, or the strategies that
tie for it when they differ by less than their measured step-time spread (``fastest``).

The limit is ``capacity x (1 - headroom)``: found-then-OOM-later is the most common complaint
about batch-size finders (Lightning#8028, #9625, #20231; Lightning shaves 5%, accelerate backs
off to 0.9), so the margin is explicit and printed.

What is judged against the limit (``fit_bytes``) is what must fit on the card: on cuda the
whole device as NVML sees it (allocator reserve + CUDA context + NCCL), not the allocated bytes
that ``compare()`` reports as the estimate's error; a batch accepted on allocated bytes alone
could still OOM by the allocator cache and context (GiBs on a big card). On cpu it is the
exact tensor bytes, what ``--device cpu`` estimates.

Calibration: a run that finished at batch b0 gives ratio = measured / estimated at b0;
the peak predicted at batch b is estimate(b) x ratio, so the largest batch predicted to fit is
the planner's exact ``max_batch_size`` against ``limit / ratio``. With ``--find-batch-size``
that prediction is the first trial (profiler/batch_search.py) and each trial recalibrates;
without it every answer is labelled predicted, not confirmed.

Pure: estimates (the planner's StrategyEstimate) and trial launches come in as functions
(profile.py passes the real ones); the records it returns are recommendation_results.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

from dpplan.config import DEFAULT_MAX_TRIALS, OFFLOADS
from dpplan.planner.plan import StrategyEstimate
from dpplan.planner.strategies.registry import strategy_info
from dpplan.profiler.batch_search import MAX_BATCH_SIZE, SearchResult, Trial, search_batch_size
from dpplan.profiler.profile_results import Measured, RunResult, RunStatus
from dpplan.profiler.recommendation_results import (
    BatchSearch,
    Calibration,
    Fastest,
    OffloadAdvice,
    OffloadLevel,
    PeakSource,
    Profiled,
    Recommendation,
    Recommendations,
    RecommendationStatus,
)


class EstimateAt(Protocol):
    def __call__(self, strategy: str, *, batch_size: int, offload: str | None = None,
                 capacity_bytes: int | None = None) -> StrategyEstimate:
        """The planner's estimate of ``strategy`` at that batch (offload: None = the profile's)."""


RunTrial = Callable[[str, int], Trial]


@dataclass(frozen=True, kw_only=True)
class Limits:
    capacity_bytes: int
    """Memory one rank may use: --gpu-memory, else the GPU's (cuda) or host RAM per rank (cpu)."""
    headroom_pct: float
    capacity_source: str
    """Where capacity_bytes comes from, said in words."""

    @property
    def limit_bytes(self) -> int:
        return int(self.capacity_bytes * (1 - self.headroom_pct / 100))


def fit_bytes(measured: Measured | None, estimate: StrategyEstimate | None, device: str) -> tuple[int | None, str]:
    """The measured bytes that must fit the capacity, and what they are (see module docstring)."""
    if device != "cuda":
        return (measured.peak_allocated_bytes if measured else None), "tensor bytes"
    if measured is not None and measured.peak_nvml_bytes is not None:
        return measured.peak_nvml_bytes, "NVML used"
    reserved = measured.peak_reserved_bytes if measured else None
    if reserved is None or not estimate:
        return None, "nothing measured"
    # Without NVML: the allocator's reserve plus the estimate's CUDA context and NCCL bytes.
    return reserved + estimate.peak_bytes - estimate.peak_reserved_bytes, "reserved + estimated context and NCCL"


def calibration(run: RunResult, device: str) -> Calibration | None:
    """measured / estimated of the fit bytes of a finished run, or None."""
    estimate = run.estimate
    if run.status != RunStatus.OK or not estimate:
        return None
    measured_bytes, quantity = fit_bytes(run.measured, estimate, device)
    if not measured_bytes or not estimate.peak_bytes:
        return None
    return Calibration(batch_size=run.settings.batch_size, measured_bytes=measured_bytes,
                       estimated_bytes=estimate.peak_bytes, ratio=measured_bytes / estimate.peak_bytes,
                       quantity=quantity)


def predicted_max_batch(estimate_at: EstimateAt, strategy: str, limit_bytes: int, ratio: float) -> int:
    """Largest b with estimate(b) x ratio <= limit (0: not even batch 1), capped at MAX_BATCH_SIZE."""
    entry = estimate_at(strategy, batch_size=1, capacity_bytes=max(1, int(limit_bytes / ratio)))
    return min(entry.max_batch_size, MAX_BATCH_SIZE)


def offload_levels(strategy: str, device: str) -> tuple[str, ...]:
    if device != "cuda":
        return ("none",)  # a CPU run holds everything in host memory already
    if not strategy_info(strategy).offload:
        return ("none",)  # e.g. torch's DDP has no offload (strategies/registry.py)
    return OFFLOADS


def offload_advice(strategy: str, *, estimate_at: EstimateAt, ratio: float, limits: Limits, device: str,
                   configured: str) -> OffloadAdvice:
    """The lightest offload whose calibrated peak at batch 1 fits the limit (None: none does)."""
    levels = []
    needed = None
    for level in offload_levels(strategy, device):
        entry = estimate_at(strategy, batch_size=1, offload=level)
        predicted = int(entry.peak_bytes * ratio)
        levels.append(OffloadLevel(offload=level, predicted_peak_bytes=predicted, host_bytes=entry.host_bytes))
        if needed is None and predicted <= limits.limit_bytes:
            needed = level
            break
    return OffloadAdvice(needed=needed, configured=configured, supported=len(offload_levels(strategy, device)) > 1,
                         levels=tuple(levels))


class Verdict(NamedTuple):
    """The micro-batch a recommendation settles on, and how its peak is known."""

    status: RecommendationStatus
    batch_size: int | None = None
    peak_bytes: int | None = None
    peak_source: PeakSource | None = None
    samples_per_s: float | None = None
    step_time_s: float | None = None
    step_time_spread_s: float | None = None


def recommend_strategy(
    run: RunResult,
    *,
    device: str,
    limits: Limits,
    estimate_at: EstimateAt,
    run_trial: RunTrial | None = None,
    max_trials: int = DEFAULT_MAX_TRIALS,
) -> Recommendation:
    """One strategy's recommendation (see the schema in recommendation_results.py)."""
    strategy, status, batch_size = run.settings.strategy, run.status, run.settings.batch_size
    calib = calibration(run, device)
    ratio = calib.ratio if calib else 1.0
    notes = []
    if calib is None:
        notes.append({"oom": f"the profile run at batch {batch_size} ran out of memory: uncalibrated estimate",
                      "skipped": "not run: estimate only", "failed": "the profile run failed: estimate only"}.get(
                          status, "nothing measured: estimate only"))
    known_good = known_bad = None
    run_fit = None
    if calib:
        run_fit = calib.measured_bytes
        if run_fit <= limits.limit_bytes:
            known_good = batch_size
        else:
            known_bad = batch_size
    elif status == RunStatus.OOM:
        known_bad = batch_size
    prediction = predicted_max_batch(estimate_at, strategy, limits.limit_bytes, ratio)
    if known_bad is not None:
        prediction = min(prediction, known_bad - 1)  # an uncalibrated estimate may predict a batch that OOMed
    offload = offload_advice(strategy, estimate_at=estimate_at, ratio=ratio, limits=limits, device=device,
                             configured=run.settings.offload)
    measured = run.measured if status == RunStatus.OK else None
    profiled = Profiled(batch_size=batch_size, status=status, fit_bytes=run_fit,
                        samples_per_s=measured.samples_per_s if measured else None,
                        step_time_s=measured.step_time_s if measured else None,
                        step_time_spread_s=measured.step_time_spread_s if measured else None)
    search = verdict = None
    searchable = status in (RunStatus.OK, RunStatus.OOM) and (prediction >= 1 or known_good)
    if run_trial is not None and searchable:
        result = search_batch_size(
            first=max(prediction, 1), run_trial=lambda batch: run_trial(strategy, batch),
            predict=lambda trial: _recalibrated(estimate_at, strategy, trial, limits),
            max_trials=max_trials, known_good=known_good, known_bad=known_bad,
        )
        search = BatchSearch.of(result)
        verdict = _searched(result, run_fit, profiled)
    elif run_trial is not None and status not in (RunStatus.OK, RunStatus.OOM):
        notes.append("no batch-size search: the profile run did not finish")
    if verdict is None:
        verdict = _predicted(prediction, ratio, estimate_at, strategy)
    needed = offload.needed
    if verdict.status == RecommendationStatus.CONFIRMED and (
            needed is None or OFFLOADS.index(needed) > OFFLOADS.index(offload.configured)):
        # Measured beats predicted: a real run fitted with the profiled offload.
        offload = replace(offload, needed=offload.configured)
        notes.append(f"the estimate at batch 1 needed more offload, but a measured run fits with offload {offload.configured}")
    return Recommendation(
        strategy=strategy, status=verdict.status, batch_size=verdict.batch_size, peak_bytes=verdict.peak_bytes,
        peak_source=verdict.peak_source, samples_per_s=verdict.samples_per_s, step_time_s=verdict.step_time_s,
        step_time_spread_s=verdict.step_time_spread_s, predicted_batch_size=prediction,
        calibration=calib, search=search, offload=offload, profiled=profiled, notes=tuple(notes),
    )


def _recalibrated(estimate_at: EstimateAt, strategy: str, trial: Trial, limits: Limits) -> int | None:
    if trial.peak_bytes is None:
        return None
    estimated = estimate_at(strategy, batch_size=trial.batch_size).peak_bytes
    return predicted_max_batch(estimate_at, strategy, limits.limit_bytes, trial.peak_bytes / estimated)


def _searched(result: SearchResult, run_fit: int | None, profiled: Profiled) -> Verdict:
    if result.batch_size is None:
        return Verdict(RecommendationStatus.DOES_NOT_FIT if result.smallest_rejected == 1 else RecommendationStatus.UNKNOWN)
    accepted = [t for t in result.trials if t.accepted and t.batch_size == result.batch_size]
    if accepted:
        trial = accepted[-1]
        peak_bytes, samples_per_s, step, spread = (trial.peak_bytes, trial.samples_per_s, trial.step_time_s,
                                                   trial.step_time_spread_s)
    else:  # the profile run itself is the largest accepted batch
        peak_bytes, samples_per_s, step, spread = (run_fit, profiled.samples_per_s, profiled.step_time_s,
                                                   profiled.step_time_spread_s)
    return Verdict(RecommendationStatus.CONFIRMED, batch_size=result.batch_size, peak_bytes=peak_bytes,
                   peak_source=PeakSource.MEASURED, samples_per_s=samples_per_s, step_time_s=step,
                   step_time_spread_s=spread)


def _predicted(prediction: int, ratio: float, estimate_at: EstimateAt, strategy: str) -> Verdict:
    if prediction < 1:
        return Verdict(RecommendationStatus.DOES_NOT_FIT)
    entry = estimate_at(strategy, batch_size=prediction)
    return Verdict(RecommendationStatus.PREDICTED, batch_size=prediction, peak_bytes=int(entry.peak_bytes * ratio),
                   peak_source=PeakSource.PREDICTED)


class Timing(NamedTuple):
    """One candidate's measured speed, where fastest() compares it."""

    strategy: str
    samples_per_s: float
    batch_size: int
    step_time_s: float | None
    step_time_spread_s: float | None

    @property
    def seconds_per_sample(self) -> float:
        return 1.0 / self.samples_per_s

    @property
    def spread_per_sample(self) -> float | None:
        """The step-time spread as seconds per sample: comparable across micro-batches."""
        if self.step_time_spread_s is None or not self.step_time_s:
            return None
        return self.seconds_per_sample * self.step_time_spread_s / self.step_time_s


def allowed_spread(best: Timing, other: Timing) -> float | None:
    """The larger of two candidates' step-time spreads, in seconds per sample; None when
    either is unknown (one timed step)."""
    spreads = [s for s in (best.spread_per_sample, other.spread_per_sample) if s is not None]
    return max(spreads) if len(spreads) == 2 else None


def ties(best: Timing, other: Timing) -> bool:
    """Whether ``other`` is as fast as ``best`` within what was measured: their time per sample
    differs by no more than the larger of their step-time spreads. Unknown spreads never tie:
    nothing says the difference is noise."""
    allowed = allowed_spread(best, other)
    return allowed is not None and other.seconds_per_sample - best.seconds_per_sample <= allowed


def fastest(recommendations: Sequence[Recommendation]) -> Fastest | None:
    """The highest samples/s among strategies that fit without more offload than was profiled,
    and the strategies that tie with it.

    Throughput at each strategy's own recommended batch when a trial (or the profile run)
    measured every candidate there; else the profile runs', all at the profiled batch (same
    batch for every strategy: a fair comparison, though not at the recommended batch). Time per
    sample is what is compared, so that runs at different micro-batches compare too; at one
    micro-batch that is the step times. A strategy ties with the best when the difference is
    within the measured spread (``ties``): then none is named the fastest."""
    # confirmed / predicted means it fits with the profiled offload: trials and predictions use it.
    fits = (RecommendationStatus.CONFIRMED, RecommendationStatus.PREDICTED)
    candidates = [r for r in recommendations if r.status in fits and r.profiled.samples_per_s]
    if not candidates:
        return None
    if all(r.samples_per_s for r in candidates):
        basis = "measured at each strategy's recommended micro-batch"
        timings = [Timing(r.strategy, r.samples_per_s or 0.0, r.batch_size or 0, r.step_time_s, r.step_time_spread_s)
                   for r in candidates]
    else:
        basis = "measured in the profile runs, all at the profiled micro-batch"
        timings = [Timing(r.strategy, r.profiled.samples_per_s or 0.0, r.profiled.batch_size, r.profiled.step_time_s,
                          r.profiled.step_time_spread_s) for r in candidates]
    timings.sort(key=lambda t: t.samples_per_s, reverse=True)
    best, others = timings[0], timings[1:]
    tied = [t for t in others if ties(best, t)]
    # The spread the comparison allowed, said at the best's step: with the tied ones, else the runner-up.
    compared = [allowed_spread(best, t) for t in (tied or others[:1])]
    spread_s = None
    if best.step_time_s and compared and None not in compared:
        samples_per_step = best.step_time_s * best.samples_per_s
        spread_s = max(c for c in compared if c is not None) * samples_per_step
    elif not others:
        spread_s = best.step_time_spread_s
    return Fastest(strategy=best.strategy, samples_per_s=best.samples_per_s, batch_size=best.batch_size,
                   basis=basis, num_candidates=len(candidates), tied_with=tuple(t.strategy for t in tied),
                   step_time_s=best.step_time_s, step_time_spread_s=spread_s)


def recommend(
    runs: Sequence[RunResult],
    *,
    device: str,
    limits: Limits,
    estimate_at: EstimateAt,
    run_trial: RunTrial | None = None,
    max_trials: int = DEFAULT_MAX_TRIALS,
    notes: tuple[str, ...] = (),
) -> Recommendations:
    """The ``recommendations`` section of profile.json for every run of a profile."""
    strategies = tuple(
        recommend_strategy(run, device=device, limits=limits, estimate_at=estimate_at, run_trial=run_trial,
                           max_trials=max_trials)
        for run in runs
    )
    return Recommendations(
        capacity_bytes=limits.capacity_bytes, capacity_source=limits.capacity_source,
        headroom_pct=limits.headroom_pct, limit_bytes=limits.limit_bytes,
        find_batch_size=run_trial is not None, max_trials=max_trials if run_trial is not None else None,
        strategies=strategies, fastest=fastest(strategies), notes=tuple(notes),
    )
