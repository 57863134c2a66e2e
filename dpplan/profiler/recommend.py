"""Recommendations from a profile: per strategy the largest micro-batch that fits with a stated
headroom, whether offload is needed, and the fastest strategy that fits.

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

Pure: estimates and trial launches come in as functions (profile.py passes the real ones).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol

from dpplan.config import DEFAULT_MAX_TRIALS, OFFLOADS
from dpplan.planner.strategies.registry import strategy_info
from dpplan.profiler.batch_search import MAX_BATCH_SIZE, SearchResult, Trial, search_batch_size


class EstimateAt(Protocol):
    def __call__(self, strategy: str, *, batch_size: int, offload: str | None = None,
                 capacity_bytes: int | None = None) -> dict:
        """The `dpplan estimate` JSON entry of ``strategy`` at that batch (offload: None = the profile's)."""


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


def fit_bytes(measured: dict, estimate: dict | None, device: str) -> tuple[int | None, str]:
    """The measured bytes that must fit the capacity, and what they are (see module docstring)."""
    if device != "cuda":
        return measured.get("peak_allocated_bytes"), "tensor bytes"
    if measured.get("peak_nvml_bytes") is not None:
        return measured["peak_nvml_bytes"], "NVML used"
    reserved = measured.get("peak_reserved_bytes")
    if reserved is None or not estimate:
        return None, "nothing measured"
    # Without NVML: the allocator's reserve plus the estimate's CUDA context and NCCL bytes.
    return reserved + estimate["peak_bytes"] - estimate["peak_reserved_bytes"], "reserved + estimated context and NCCL"


def calibration(run: dict, device: str) -> dict | None:
    """measured / estimated of the fit bytes of a finished run, or None."""
    estimate, measured = run.get("estimate"), run.get("measured") or {}
    if run.get("status") != "ok" or not estimate:
        return None
    measured_bytes, quantity = fit_bytes(measured, estimate, device)
    if not measured_bytes or not estimate["peak_bytes"]:
        return None
    return {
        "batch_size": run["batch_size"], "measured_bytes": measured_bytes, "estimated_bytes": estimate["peak_bytes"],
        "ratio": measured_bytes / estimate["peak_bytes"], "quantity": quantity,
    }


def predicted_max_batch(estimate_at: EstimateAt, strategy: str, limit_bytes: int, ratio: float) -> int:
    """Largest b with estimate(b) x ratio <= limit (0: not even batch 1), capped at MAX_BATCH_SIZE."""
    entry = estimate_at(strategy, batch_size=1, capacity_bytes=max(1, int(limit_bytes / ratio)))
    return min(entry["max_batch_size"], MAX_BATCH_SIZE)


def offload_levels(strategy: str, device: str) -> tuple[str, ...]:
    if device != "cuda":
        return ("none",)  # a CPU run holds everything in host memory already
    if not strategy_info(strategy).offload:
        return ("none",)  # e.g. torch's DDP has no offload (strategies/registry.py)
    return OFFLOADS


def offload_advice(strategy: str, *, estimate_at: EstimateAt, ratio: float, limits: Limits, device: str,
                   configured: str) -> dict:
    """The lightest offload whose calibrated peak at batch 1 fits the limit (None: none does)."""
    levels = []
    needed = None
    for level in offload_levels(strategy, device):
        entry = estimate_at(strategy, batch_size=1, offload=level)
        predicted = int(entry["peak_bytes"] * ratio)
        levels.append({"offload": level, "predicted_peak_bytes": predicted, "host_bytes": entry.get("host_bytes")})
        if needed is None and predicted <= limits.limit_bytes:
            needed = level
            break
    return {"needed": needed, "configured": configured, "supported": len(offload_levels(strategy, device)) > 1,
            "levels": levels}


def recommend_strategy(
    run: dict,
    *,
    device: str,
    limits: Limits,
    estimate_at: EstimateAt,
    run_trial: RunTrial | None = None,
    max_trials: int = DEFAULT_MAX_TRIALS,
) -> dict:
    """One strategy's recommendation (see the ``recommendations`` schema in profile_results.py)."""
    strategy, status = run["strategy"], run["status"]
    calib = calibration(run, device)
    ratio = calib["ratio"] if calib else 1.0
    notes = []
    if calib is None:
        notes.append({"oom": f"the profile run at batch {run['batch_size']} ran out of memory: uncalibrated estimate",
                      "skipped": "not run: estimate only", "failed": "the profile run failed: estimate only"}.get(
                          status, "nothing measured: estimate only"))
    known_good = known_bad = None
    run_fit = None
    if calib:
        run_fit = calib["measured_bytes"]
        if run_fit <= limits.limit_bytes:
            known_good = run["batch_size"]
        else:
            known_bad = run["batch_size"]
    elif status == "oom":
        known_bad = run["batch_size"]
    prediction = predicted_max_batch(estimate_at, strategy, limits.limit_bytes, ratio)
    if known_bad is not None:
        prediction = min(prediction, known_bad - 1)  # an uncalibrated estimate may predict a batch that OOMed
    offload = offload_advice(strategy, estimate_at=estimate_at, ratio=ratio, limits=limits, device=device,
                             configured=run.get("offload", "none"))
    recommendation = {
        "strategy": strategy, "status": None, "batch_size": None, "peak_bytes": None, "peak_source": None,
        "samples_per_s": None, "predicted_batch_size": prediction, "calibration": calib, "search": None,
        "offload": offload, "profiled": {
            "batch_size": run["batch_size"], "status": status, "fit_bytes": run_fit,
            "samples_per_s": (run.get("measured") or {}).get("samples_per_s") if status == "ok" else None,
        },
        "notes": notes,
    }
    searchable = status in ("ok", "oom") and (prediction >= 1 or known_good)
    if run_trial is not None and searchable:
        result = search_batch_size(
            first=max(prediction, 1), run_trial=lambda batch: run_trial(strategy, batch),
            predict=lambda trial: _recalibrated(estimate_at, strategy, trial, limits),
            max_trials=max_trials, known_good=known_good, known_bad=known_bad,
        )
        recommendation["search"] = _search_json(result)
        _apply_search(recommendation, result, run, run_fit)
    elif run_trial is not None and status not in ("ok", "oom"):
        notes.append("no batch-size search: the profile run did not finish")
    if recommendation["status"] is None:
        _apply_prediction(recommendation, prediction, ratio, estimate_at, strategy)
    needed = offload["needed"]
    if recommendation["status"] == "confirmed" and (needed is None or OFFLOADS.index(needed) > OFFLOADS.index(offload["configured"])):
        # Measured beats predicted: a real run fitted with the profiled offload.
        offload["needed"] = offload["configured"]
        notes.append(f"the estimate at batch 1 needed more offload, but a measured run fits with offload {offload['configured']}")
    return recommendation


def _recalibrated(estimate_at: EstimateAt, strategy: str, trial: Trial, limits: Limits) -> int | None:
    if trial.peak_bytes is None:
        return None
    estimated = estimate_at(strategy, batch_size=trial.batch_size)["peak_bytes"]
    return predicted_max_batch(estimate_at, strategy, limits.limit_bytes, trial.peak_bytes / estimated)


def _search_json(result: SearchResult) -> dict:
    return {
        "num_trials": len(result.trials), "converged": result.converged, "stop_reason": result.stop_reason,
        "smallest_rejected": result.smallest_rejected,
        "trials": [{**asdict(t), "accepted": t.accepted} for t in result.trials],
    }


def _apply_search(recommendation: dict, result: SearchResult, run: dict, run_fit: int | None) -> None:
    if result.batch_size is None:
        recommendation["status"] = "does_not_fit" if result.smallest_rejected == 1 else "unknown"
        return
    accepted = [t for t in result.trials if t.accepted and t.batch_size == result.batch_size]
    recommendation.update(status="confirmed", batch_size=result.batch_size, peak_source="measured")
    if accepted:
        recommendation.update(peak_bytes=accepted[-1].peak_bytes, samples_per_s=accepted[-1].samples_per_s)
    else:  # the profile run itself is the largest accepted batch
        recommendation.update(peak_bytes=run_fit, samples_per_s=recommendation["profiled"]["samples_per_s"])


def _apply_prediction(recommendation: dict, prediction: int, ratio: float, estimate_at: EstimateAt,
                      strategy: str) -> None:
    if prediction < 1:
        recommendation["status"] = "does_not_fit"
        return
    entry = estimate_at(strategy, batch_size=prediction)
    recommendation.update(status="predicted", batch_size=prediction, peak_bytes=int(entry["peak_bytes"] * ratio),
                          peak_source="predicted")


def fastest(recommendations: list[dict]) -> dict | None:
    """The highest samples/s among strategies that fit without more offload than was profiled.

    Throughput at each strategy's own recommended batch when a trial (or the profile run)
    measured every candidate there; else the profile runs', all at the profiled batch (same
    batch for every strategy: a fair comparison, though not at the recommended batch)."""
    # confirmed / predicted means it fits with the profiled offload: trials and predictions use it.
    candidates = [r for r in recommendations if r["status"] in ("confirmed", "predicted") and r["profiled"]["samples_per_s"]]
    if not candidates:
        return None
    if all(r["samples_per_s"] for r in candidates):
        best = max(candidates, key=lambda r: r["samples_per_s"])
        return {"strategy": best["strategy"], "samples_per_s": best["samples_per_s"], "batch_size": best["batch_size"],
                "basis": "measured at each strategy's recommended micro-batch",
                "num_candidates": len(candidates)}
    best = max(candidates, key=lambda r: r["profiled"]["samples_per_s"])
    return {"strategy": best["strategy"], "samples_per_s": best["profiled"]["samples_per_s"],
            "batch_size": best["profiled"]["batch_size"],
            "basis": "measured in the profile runs, all at the profiled micro-batch",
            "num_candidates": len(candidates)}


def recommend(
    runs: list[dict],
    *,
    device: str,
    limits: Limits,
    estimate_at: EstimateAt,
    run_trial: RunTrial | None = None,
    max_trials: int = DEFAULT_MAX_TRIALS,
    notes: tuple[str, ...] = (),
) -> dict:
    """The ``recommendations`` section of profile.json for every run of a profile."""
    strategies = [
        recommend_strategy(run, device=device, limits=limits, estimate_at=estimate_at, run_trial=run_trial,
                           max_trials=max_trials)
        for run in runs
    ]
    return {
        "capacity_bytes": limits.capacity_bytes, "capacity_source": limits.capacity_source,
        "headroom_pct": limits.headroom_pct, "limit_bytes": limits.limit_bytes,
        "find_batch_size": run_trial is not None, "max_trials": max_trials if run_trial is not None else None,
        "strategies": strategies, "fastest": fastest(strategies), "notes": list(notes),
    }
