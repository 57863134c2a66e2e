"""The recommendations of a profile as sentences, shared by the terminal table and the HTML report.

Each sentence says the verdict and the numbers it rests on; the numbers come from
profiler/recommend.py, none is computed here.
"""

from __future__ import annotations

from dpplan.profiler.recommendation_results import Fastest, Recommendation, Recommendations
from dpplan.reports.units import format_bytes, format_count


def format_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def format_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else format_count(int(round(value)))


OFFLOAD_ORDER = ("none", "optimizer", "optimizer+params")


def _trials(count: int) -> str:
    return f"{count} trial{'s' if count != 1 else ''}"


NOT_MEASURED = {"skipped": "not run: estimate only", "failed": "its run failed: estimate only"}
"""What a strategy's verdict rests on when its profile run measured nothing."""


def subject(rec: Recommendation) -> str:
    """The strategy, and "(not run: estimate only)" when no run of it measured anything: a
    verdict from the estimate alone never reads as if a run had shown it."""
    basis = NOT_MEASURED.get(str(rec.profiled.status))
    return f"{rec.strategy} ({basis})" if basis else rec.strategy


def recommendation_line(rec: Recommendation, section: Recommendations) -> str:
    """One strategy's micro-batch verdict with its reason."""
    strategy, headroom = subject(rec), f"{section.headroom_pct:g}%"
    capacity = format_bytes(section.capacity_bytes)
    search = rec.search
    if rec.status == "confirmed":
        how = f"confirmed in {_trials(search.num_trials)}" if search and search.num_trials else (
            f"confirmed by the profile run at batch {rec.batch_size}")
        if search and not search.converged:
            how += f"; a larger one may fit ({search.stop_reason})"
        return (f"{strategy}: micro-batch {rec.batch_size} fits with {headroom} headroom "
                f"(peak {format_bytes(rec.peak_bytes)} of {capacity}; {how})")
    if rec.status == "predicted":
        return (f"{strategy}: micro-batch {rec.batch_size} should fit with {headroom} headroom "
                f"(predicted peak {format_bytes(rec.peak_bytes)} of {capacity}; predicted, not confirmed)")
    if rec.status == "does_not_fit":
        how = f" (rejected in {_trials(search.num_trials)})" if search and search.num_trials else ""
        return f"{strategy}: does not fit even at micro-batch 1 with {headroom} headroom{how}"
    reason = search.stop_reason if search else "nothing measured"
    return f"{strategy}: no micro-batch confirmed ({reason})"


def offload_line(rec: Recommendation, section: Recommendations) -> str | None:
    """Whether offload is needed, with the batch-1 peaks that say so; None when it is not a question."""
    offload, strategy = rec.offload, subject(rec)
    needed, configured, levels = offload.needed, offload.configured, offload.levels
    limit = format_bytes(section.limit_bytes)
    by_level = {level.offload: level.predicted_peak_bytes for level in levels}
    without = by_level.get(configured, by_level.get("none"))
    if needed is None:
        if not offload.supported:
            return f"{strategy}: has no offload here; a zero*/fsdp* strategy shards or offloads more" if (
                rec.status == "does_not_fit") else None
        return (f"{strategy}: does not fit even with optimizer+params offload "
                f"(batch 1 peak {format_bytes(levels[-1].predicted_peak_bytes)} > limit {limit})")
    if needed == "none":
        if configured != "none":
            return (f"{strategy}: offload {configured} is not needed "
                    f"(batch 1 peak {format_bytes(by_level['none'])} without it, limit {limit})")
        return f"{strategy}: no offload needed" if rec.status in ("confirmed", "predicted") else None
    if OFFLOAD_ORDER.index(needed) > OFFLOAD_ORDER.index(configured):
        return (f"{strategy}: needs {needed} offload (batch 1 peak {format_bytes(without)} > limit {limit}; "
                f"with offload {format_bytes(levels[-1].predicted_peak_bytes)}) - rerun with --offload {needed}")
    if OFFLOAD_ORDER.index(needed) < OFFLOAD_ORDER.index(configured):
        return (f"{strategy}: {needed} offload is enough, {configured} is not needed "
                f"(batch 1 peak {format_bytes(levels[-1].predicted_peak_bytes)}, limit {limit})")
    return None


def format_step(seconds: float, unit_of: float | None = None) -> str:
    """A step time in ms below a second, else in s; ``unit_of``: use that value's unit."""
    if (unit_of if unit_of is not None else seconds) < 1:
        return f"{1000 * seconds:.1f} ms"
    return f"{seconds:.2f} s"


def _names(strategies: list[str]) -> str:
    return strategies[0] if len(strategies) == 1 else ", ".join(strategies[:-1]) + " and " + strategies[-1]


def fastest_line(fastest: Fastest) -> str:
    """The fastest strategy that fits, or the ones that tie (recommend.fastest decides)."""
    rate = f"{format_rate(fastest.samples_per_s)} samples/s at batch {fastest.batch_size}"
    step, spread = fastest.step_time_s, fastest.step_time_spread_s
    if fastest.tied_with and step is not None and spread is not None:
        return (f"{_names([fastest.strategy, *fastest.tied_with])} tie at {format_step(step)} ± "
                f"{format_step(spread, step)} per step ({fastest.strategy}: {rate}; the difference is within the "
                f"measured step-time spread; {fastest.basis})")
    margin = ""
    if fastest.num_candidates > 1 and step is not None:
        margin = (f"; more than the measured step-time spread ({format_step(spread, step)}) ahead of the next"
                  if spread is not None else "; no step-time spread measured (one timed step), a tie cannot be told")
    return f"{fastest.strategy}: fastest that fits ({rate}; {fastest.basis}{margin})"
