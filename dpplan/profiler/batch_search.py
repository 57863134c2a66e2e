"""The largest micro-batch that really fits, found with fresh launched jobs (one per trial).

An in-process finder (Lightning, accelerate) retries inside one process after an OOM; for
distributed runs that is refused or fragile (one rank's OOM leaves the others blocked in a
collective, and the allocator is fragmented afterwards). Here every trial is a new torchrun
job, as DeepSpeed's autotuner does: a trial passes only when every rank wrote an ok result
*and* the measured peak is within the headroom limit. A missing rank result, an OOM, a
failure or a peak over the limit all reject the batch.

The search starts from a prediction (the estimate calibrated by a measured run), then:
accepted -> try the next prediction, recalibrated by what this trial measured (or the next
batch up when the prediction says this one is the edge: one trial proves the edge);
rejected -> the recalibrated prediction when it is below the rejected batch, else bisect
between the largest accepted and the smallest rejected batch. It stops when those two are
neighbours (converged), at ``max_trials``, or at ``max_batch_size``.

Pure logic: launching and predicting are the callers' functions, so tests drive it with fakes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

GROWTH = 1.25
"""Step up when nothing predicts the next batch (no measured peak): accelerate's back-off went
from 0.5 to 0.9 (PR #3684) because halving wasted capacity; a gentle step up is the same idea."""
MAX_BATCH_SIZE = 8192
"""Never try more than this per rank (Lightning's ``max_val``: huge batches exhaust host memory
through data loading before the GPU fills)."""
TRIAL_STATUSES = ("ok", "over_limit", "oom", "failed", "not_run")


@dataclass(frozen=True, kw_only=True)
class Trial:
    """One launched job at one micro-batch."""

    batch_size: int
    status: str
    """ok (accepted) | over_limit (ran, but its peak is above the headroom limit) | oom | failed
    (a rank failed, timed out or wrote no result) | not_run (its estimate does not fit this
    machine, profiler/launch_fit.py: not launched, and the search stops, since what the batch
    would do is not known)."""
    peak_bytes: int | None
    """The measured bytes judged against the limit (None when the job did not finish)."""
    limit_bytes: int
    samples_per_s: float | None = None
    step_time_s: float | None = None
    step_time_spread_s: float | None = None
    """The median timed step and the spread of the steps (profile_results.step_time_spread)."""
    seconds: float = 0.0
    error: str | None = None
    dir: str | None = None

    def __post_init__(self):
        if self.status not in TRIAL_STATUSES:
            raise ValueError(f"status must be one of {', '.join(TRIAL_STATUSES)} (got {self.status!r})")

    @property
    def accepted(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    batch_size: int | None
    """The largest accepted micro-batch (a trial's, or ``known_good``'s); None: none accepted."""
    smallest_rejected: int | None
    trials: tuple[Trial, ...]
    converged: bool
    """True when ``batch_size + 1`` was rejected (or batch 1 was): the answer is exact."""
    stop_reason: str


def judge(batch_size: int, status: str, peak_bytes: int | None, limit_bytes: int, **details) -> Trial:
    """A finished job as a trial: an ok run whose peak is over the limit is rejected too."""
    if status == "ok" and (peak_bytes is None or peak_bytes > limit_bytes):
        status = "over_limit"
    return Trial(batch_size=batch_size, status=status, peak_bytes=peak_bytes, limit_bytes=limit_bytes, **details)


def next_batch_size(good: int | None, bad: int | None, prediction: int | None, *, max_batch_size: int) -> int | None:
    """The next batch to try between the largest accepted (``good``) and the smallest rejected
    (``bad``), or None when there is nothing left to learn."""
    low = good or 0
    high = min(bad, max_batch_size + 1) if bad is not None else max_batch_size + 1
    if high - low <= 1:
        return None
    if prediction is not None:
        prediction = min(prediction, max_batch_size)
    if prediction is not None and low < prediction < high:
        return prediction
    if prediction is not None and prediction == low and good is not None:
        return low + 1  # the calibrated estimate says ``good`` is the edge: one trial proves it
    if bad is None:
        return min(max(low + 1, math.ceil(low * GROWTH)), max_batch_size)
    return (low + high) // 2


def search_batch_size(
    *,
    first: int,
    run_trial: Callable[[int], Trial],
    predict: Callable[[Trial], int | None],
    max_trials: int,
    known_good: int | None = None,
    known_bad: int | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
) -> SearchResult:
    """Run trials from ``first`` until converged or ``max_trials`` jobs have run.

    ``predict(trial)``: the largest batch predicted to fit after recalibrating with that
    trial's measured peak (None when it measured none). ``known_good`` / ``known_bad``: batches
    already settled by the profile run itself (not counted as trials)."""
    if max_trials < 1:
        raise ValueError(f"max_trials must be >= 1 (got {max_trials})")
    good, bad = known_good, known_bad
    trials: list[Trial] = []
    candidate = next_batch_size(good, bad, max(1, first), max_batch_size=max_batch_size)
    not_run = None
    while candidate is not None and len(trials) < max_trials:
        trial = run_trial(candidate)
        trials.append(trial)
        if trial.status == "not_run":
            not_run = trial
            break
        if trial.accepted:
            good = max(good or 0, candidate)
        else:
            bad = candidate if bad is None else min(bad, candidate)
        candidate = next_batch_size(good, bad, predict(trial), max_batch_size=max_batch_size)
    converged = bad is not None and bad == (good or 0) + 1
    if not_run is not None:
        reason = f"batch {not_run.batch_size} {not_run.error}"  # "batch 64 not launched: ddp on ... needs ..."
    elif converged:
        reason = "batch 1 was rejected" if good is None else f"batch {good} fits and {bad} does not"
    elif candidate is None:
        reason = f"reached the {max_batch_size} cap"
    else:
        reason = f"stopped after {max_trials} trial{'s' if max_trials > 1 else ''} (next would be {candidate})"
    return SearchResult(batch_size=good, smallest_rejected=bad, trials=tuple(trials), converged=converged,
                        stop_reason=reason)
