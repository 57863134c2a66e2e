"""Each rank's memory over time, small enough for profile.json and the HTML report.

A CPU run records every allocation (thousands per step) and NVML samples at 100 Hz, so a
series is reduced before it is written: each step is cut into equal intervals and each
interval keeps its lowest and its highest reading, at their own times (the "min-max"
decimation plotting libraries use for long signals). Every step's peak survives exactly, so
the drawn line reaches the measured peak of the timed steps, and the troughs between steps
stay visible.

Times are seconds from the start of the first (warm-up) step of the run.

Series schema (``per_rank[i]["memory_series"]`` in profile.json):
  {time_origin, warmup_steps, step_starts_s [one per step], end_s,
   lines: {name: {label, time_s [..], bytes [..]}}}
  line names: ``allocated`` (cpu: exact live tensor bytes; cuda: torch allocated, the level at
  each phase start and the phase's peak at its end), ``reserved`` (cuda: the same for torch
  reserved), ``nvml_used`` (cuda: NVML "used" of the rank's device, every sample).
"""

from __future__ import annotations

import numpy as np

MAX_POINTS = 400
"""Intervals per line; each keeps two readings, so a line has at most 800 points."""

TIME_ORIGIN = "start of the first (warm-up) step"


def decimate(time_s, values, max_points: int = MAX_POINTS) -> tuple[list[float], list[int]]:
    """The lowest and highest reading of each of ``max_points`` equal time intervals, in time order.

    ``time_s`` must be sorted. Series shorter than ``2 * max_points`` are returned whole.
    """
    times = np.asarray(time_s, dtype=np.float64)
    levels = np.asarray(values, dtype=np.int64)
    if times.shape != levels.shape:
        raise ValueError(f"time_s and values differ in length ({times.size} vs {levels.size})")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1 (got {max_points})")
    if times.size <= 2 * max_points:
        return times.tolist(), levels.tolist()
    span = times[-1] - times[0]
    if span <= 0:
        bucket = np.zeros(times.size, dtype=np.int64)
    else:
        bucket = np.minimum(((times - times[0]) / span * max_points).astype(np.int64), max_points - 1)
    # Buckets are contiguous runs because times are sorted: reduceat over each run's start.
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    keep = set()
    for start, end in zip(starts, np.r_[starts[1:], times.size]):
        window = levels[start:end]
        keep.add(int(start + np.argmin(window)))
        keep.add(int(start + np.argmax(window)))
    order = sorted(keep)
    return times[order].tolist(), levels[order].tolist()


def line(label: str, time_s, values, step_starts_s, max_points: int = MAX_POINTS) -> dict:
    """A named series decimated step by step (``step_starts_s`` sorted, same clock as ``time_s``)."""
    times = np.asarray(time_s, dtype=np.float64)
    levels = np.asarray(values, dtype=np.int64)
    cuts = np.searchsorted(times, np.asarray(step_starts_s[1:], dtype=np.float64), side="left")
    per_step = max(1, max_points // max(1, len(step_starts_s)))
    kept_times: list[float] = []
    kept_levels: list[int] = []
    for part_times, part_levels in zip(np.split(times, cuts), np.split(levels, cuts)):
        part = decimate(part_times, part_levels, per_step)
        kept_times += part[0]
        kept_levels += part[1]
    return {"label": label, "time_s": kept_times, "bytes": kept_levels}


def cpu_series(timeline, *, warmup_steps: int, num_steps: int, max_points: int = MAX_POINTS) -> dict:
    """From a ``cpu_memory.MemoryTimeline`` whose steps are marked ``step0``, ``step1``, ...

    Starts with the level at the first step's start (what the build left), ends at the last
    step's end.
    """
    spans = [timeline.mark_spans(f"step{s}")[0] for s in range(num_steps)]
    origin_ns, end_ns = spans[0][0], spans[-1][1]
    inside = (timeline.time_ns >= origin_ns) & (timeline.time_ns <= end_ns)
    times_ns = np.r_[origin_ns, timeline.time_ns[inside], end_ns]
    levels = np.r_[timeline.level_at(origin_ns), timeline.total_bytes[inside], timeline.level_at(end_ns)]
    to_s = 1e-9
    return {
        "time_origin": TIME_ORIGIN,
        "warmup_steps": warmup_steps,
        "step_starts_s": [(start - origin_ns) * to_s for start, _ in spans],
        "end_s": (end_ns - origin_ns) * to_s,
        "lines": {
            "allocated": line(
                "allocated tensor bytes (exact)", (times_ns - origin_ns) * to_s, levels,
                [(start - origin_ns) * to_s for start, _ in spans], max_points,
            ),
        },
    }


def cuda_series(
    *,
    origin_s: float,
    step_starts_s: list[float],
    end_s: float,
    warmup_steps: int,
    torch_points: list[tuple[float, int, int]],
    nvml_samples: list,
    max_points: int = MAX_POINTS,
) -> dict:
    """``torch_points``: (perf_counter s, allocated, reserved) from ``CudaPhaseMeter.points``;
    ``nvml_samples``: ``GpuSample`` list (perf_counter times). Only readings inside the steps."""
    torch_inside = [p for p in torch_points if origin_s <= p[0] <= end_s]
    nvml_inside = [s for s in nvml_samples if origin_s <= s.time_s <= end_s]
    steps = [t - origin_s for t in step_starts_s]
    lines = {}
    if torch_inside:
        times = [p[0] - origin_s for p in torch_inside]
        lines["allocated"] = line(
            "torch allocated (phase start, phase peak)", times, [p[1] for p in torch_inside], steps, max_points,
        )
        lines["reserved"] = line(
            "torch reserved (phase start, phase peak)", times, [p[2] for p in torch_inside], steps, max_points,
        )
    if nvml_inside:
        lines["nvml_used"] = line(
            "NVML used (whole device)", [s.time_s - origin_s for s in nvml_inside],
            [s.used_bytes for s in nvml_inside], steps, max_points,
        )
    return {
        "time_origin": TIME_ORIGIN,
        "warmup_steps": warmup_steps,
        "step_starts_s": steps,
        "end_s": end_s - origin_s,
        "lines": lines,
    }
