"""The ``recommendations`` section of profile.json as typed records (the logic is recommend.py's).

Schema, each record's ``to_json()``:
  recommendations: {capacity_bytes, capacity_source, headroom_pct, limit_bytes (capacity x
        (1 - headroom)), find_batch_size, max_trials, strategies: [recommendation...], fastest,
        notes[]}
  recommendation: {strategy, status (confirmed | predicted | does_not_fit | unknown),
        batch_size (per rank), peak_bytes, peak_source (measured | predicted), samples_per_s,
        step_time_s, step_time_spread_s (at batch_size, when measured there), predicted_batch_size
        (the calibrated prediction, the first trial), calibration {batch_size, measured_bytes,
        estimated_bytes, ratio, quantity}, search {num_trials, converged, stop_reason,
        smallest_rejected, trials: [{batch_size, status (ok | over_limit | oom | failed |
        not_run), peak_bytes, limit_bytes, samples_per_s, step_time_s, step_time_spread_s,
        seconds, error, dir, accepted}]} (null without --find-batch-size), offload {needed (none |
        optimizer | optimizer+params | null: none fits), configured, supported, levels:
        [{offload, predicted_peak_bytes (batch 1, calibrated), host_bytes}]}, profiled
        {batch_size, status, fit_bytes, samples_per_s, step_time_s, step_time_spread_s}, notes[]}
  fastest: {strategy, samples_per_s, batch_size, basis, num_candidates, tied_with[],
        step_time_s, step_time_spread_s} or null: the fastest strategy that fits, and those that
        tie with it (their difference within the measured step-time spread, recommend.py).
  The bytes judged against the limit (fit_bytes, peak_bytes, trials' peak_bytes) are NVML used
  on cuda (the whole device, context and NCCL included) and tensor bytes on cpu.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

from dpplan.json_file import known_fields
from dpplan.profiler.batch_search import SearchResult, Trial
from dpplan.profiler.profile_results import RunStatus


class RecommendationStatus(StrEnum):
    CONFIRMED = "confirmed"
    """A trial (or the profile run itself) measured it within the limit."""
    PREDICTED = "predicted"
    """The calibrated estimate says it fits; no trial ran."""
    DOES_NOT_FIT = "does_not_fit"
    UNKNOWN = "unknown"
    """The search accepted no batch but did not reject batch 1 either."""


class PeakSource(StrEnum):
    MEASURED = "measured"
    PREDICTED = "predicted"


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """measured / estimated fit bytes of the profile run: the factor every prediction is scaled by."""

    batch_size: int
    measured_bytes: int
    estimated_bytes: int
    ratio: float
    quantity: str
    """What measured_bytes are: NVML used, tensor bytes, or reserved + estimated context and NCCL."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> Calibration | None:
        return None if data is None else cls(**known_fields(cls, data))


@dataclass(frozen=True, kw_only=True)
class BatchSearch:
    """What the trial jobs of ``--find-batch-size`` found (batch_search.SearchResult, as written)."""

    num_trials: int
    converged: bool
    stop_reason: str
    smallest_rejected: int | None
    trials: tuple[Trial, ...]

    @classmethod
    def of(cls, result: SearchResult) -> BatchSearch:
        return cls(num_trials=len(result.trials), converged=result.converged, stop_reason=result.stop_reason,
                   smallest_rejected=result.smallest_rejected, trials=result.trials)

    def to_json(self) -> dict:
        return {
            "num_trials": self.num_trials, "converged": self.converged, "stop_reason": self.stop_reason,
            "smallest_rejected": self.smallest_rejected,
            "trials": [{**asdict(t), "accepted": t.accepted} for t in self.trials],
        }

    @classmethod
    def from_json(cls, data: dict | None) -> BatchSearch | None:
        if data is None:
            return None
        return cls(num_trials=data["num_trials"], converged=data["converged"], stop_reason=data["stop_reason"],
                   smallest_rejected=data.get("smallest_rejected"),
                   trials=tuple(Trial(**known_fields(Trial, t)) for t in data.get("trials") or ()))


@dataclass(frozen=True, kw_only=True)
class OffloadLevel:
    offload: str
    predicted_peak_bytes: int
    """The calibrated peak at micro-batch 1 with this offload."""
    host_bytes: int | None = None
    """Host RAM per node the offload needs (None without offload)."""


@dataclass(frozen=True, kw_only=True)
class OffloadAdvice:
    needed: str | None
    """The lightest offload that fits at micro-batch 1; None: none does."""
    configured: str
    """The offload the profile ran with."""
    supported: bool
    """Whether the strategy offers any offload here."""
    levels: tuple[OffloadLevel, ...]
    """The levels tried, lightest first, up to the one needed."""

    def to_json(self) -> dict:
        return {"needed": self.needed, "configured": self.configured, "supported": self.supported,
                "levels": [asdict(level) for level in self.levels]}

    @classmethod
    def from_json(cls, data: dict) -> OffloadAdvice:
        return cls(needed=data["needed"], configured=data["configured"], supported=data["supported"],
                   levels=tuple(OffloadLevel(**known_fields(OffloadLevel, level)) for level in data["levels"]))


@dataclass(frozen=True, kw_only=True)
class Profiled:
    """The profile run of the strategy, as the recommendation saw it."""

    batch_size: int
    status: RunStatus
    fit_bytes: int | None
    """Its measured bytes judged against the limit; None when it did not finish."""
    samples_per_s: float | None
    step_time_s: float | None = None
    step_time_spread_s: float | None = None
    """Its median timed step and the spread of its steps (profile_results.step_time_spread)."""

    def __post_init__(self):
        object.__setattr__(self, "status", RunStatus(self.status))

    def to_json(self) -> dict:
        return {"batch_size": self.batch_size, "status": str(self.status), "fit_bytes": self.fit_bytes,
                "samples_per_s": self.samples_per_s, "step_time_s": self.step_time_s,
                "step_time_spread_s": self.step_time_spread_s}

    @classmethod
    def from_json(cls, data: dict) -> Profiled:
        return cls(**known_fields(cls, data))


@dataclass(frozen=True, kw_only=True)
class Recommendation:
    """One strategy's largest micro-batch within the limit, how it is known, and the offload it needs."""

    strategy: str
    status: RecommendationStatus
    predicted_batch_size: int
    """The calibrated prediction (0: not even batch 1), the first trial of a search."""
    offload: OffloadAdvice
    profiled: Profiled
    batch_size: int | None = None
    """Micro-batch per rank; None unless confirmed or predicted."""
    peak_bytes: int | None = None
    peak_source: PeakSource | None = None
    samples_per_s: float | None = None
    """At batch_size, when a run measured it there (and its step time and spread)."""
    step_time_s: float | None = None
    step_time_spread_s: float | None = None
    calibration: Calibration | None = None
    search: BatchSearch | None = None
    """None without --find-batch-size (or when the profile run did not finish)."""
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "status", RecommendationStatus(self.status))
        if self.peak_source is not None:
            object.__setattr__(self, "peak_source", PeakSource(self.peak_source))

    def to_json(self) -> dict:
        return {
            "strategy": self.strategy, "status": str(self.status), "batch_size": self.batch_size,
            "peak_bytes": self.peak_bytes, "peak_source": None if self.peak_source is None else str(self.peak_source),
            "samples_per_s": self.samples_per_s, "step_time_s": self.step_time_s,
            "step_time_spread_s": self.step_time_spread_s, "predicted_batch_size": self.predicted_batch_size,
            "calibration": self.calibration.to_json() if self.calibration else None,
            "search": self.search.to_json() if self.search else None,
            "offload": self.offload.to_json(), "profiled": self.profiled.to_json(), "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: dict) -> Recommendation:
        return cls(
            strategy=data["strategy"], status=data["status"], predicted_batch_size=data["predicted_batch_size"],
            offload=OffloadAdvice.from_json(data["offload"]), profiled=Profiled.from_json(data["profiled"]),
            batch_size=data.get("batch_size"), peak_bytes=data.get("peak_bytes"), peak_source=data.get("peak_source"),
            samples_per_s=data.get("samples_per_s"), step_time_s=data.get("step_time_s"),
            step_time_spread_s=data.get("step_time_spread_s"), calibration=Calibration.from_json(data.get("calibration")),
            search=BatchSearch.from_json(data.get("search")), notes=tuple(data.get("notes") or ()),
        )


@dataclass(frozen=True, kw_only=True)
class Fastest:
    strategy: str
    samples_per_s: float
    batch_size: int
    basis: str
    """Where samples_per_s were measured, in words."""
    num_candidates: int
    """Strategies that fit and were measured."""
    tied_with: tuple[str, ...] = ()
    """Strategies as fast within the measured spread: then no strategy is the fastest."""
    step_time_s: float | None = None
    """``strategy``'s median timed step, where samples_per_s was measured."""
    step_time_spread_s: float | None = None
    """The step-time spread the comparison allowed, said at ``strategy``'s step: two runs whose
    time per sample differs by less tie (the larger of the two runs' spreads; with the tied
    strategies, else with the runner-up; the own spread when there is no other candidate).
    None when a spread is unknown (one timed step, or a profile written before spreads were
    recorded)."""

    def __post_init__(self):
        object.__setattr__(self, "tied_with", tuple(self.tied_with))

    def to_json(self) -> dict:
        return {**asdict(self), "tied_with": list(self.tied_with)}

    @classmethod
    def from_json(cls, data: dict | None) -> Fastest | None:
        return None if data is None else cls(**known_fields(cls, data))


@dataclass(frozen=True, kw_only=True)
class Recommendations:
    capacity_bytes: int
    capacity_source: str
    headroom_pct: float
    limit_bytes: int
    """capacity x (1 - headroom): the most a recommended micro-batch may use."""
    find_batch_size: bool
    max_trials: int | None
    """Trials per strategy at most; None without --find-batch-size."""
    strategies: tuple[Recommendation, ...]
    fastest: Fastest | None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "capacity_bytes": self.capacity_bytes, "capacity_source": self.capacity_source,
            "headroom_pct": self.headroom_pct, "limit_bytes": self.limit_bytes,
            "find_batch_size": self.find_batch_size, "max_trials": self.max_trials,
            "strategies": [r.to_json() for r in self.strategies],
            "fastest": self.fastest.to_json() if self.fastest else None, "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: dict | None) -> Recommendations | None:
        if data is None:
            return None
        return cls(
            capacity_bytes=data["capacity_bytes"], capacity_source=data["capacity_source"],
            headroom_pct=data["headroom_pct"], limit_bytes=data["limit_bytes"],
            find_batch_size=data["find_batch_size"], max_trials=data.get("max_trials"),
            strategies=tuple(Recommendation.from_json(r) for r in data["strategies"]),
            fastest=Fastest.from_json(data.get("fastest")), notes=tuple(data.get("notes") or ()),
        )
