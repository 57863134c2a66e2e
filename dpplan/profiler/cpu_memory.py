"""Exact live CPU-tensor bytes of one process, from the profiler's memory events.

Method (see shared research note "measuring-cpu-memory"): start
``torch.profiler.profile(profile_memory=True)`` before the model exists; every CPU
allocation and free then carries the allocator's running total. c10 keeps that total only
for threads where the profiler is enabled unless its global flag
``FLAGS_caffe2_report_cpu_memory_usage`` is set; FSDP frees buffers on gloo worker threads,
so the flag is set first and the total is process-wide.

Phases are marked with ``record_function``; a phase's peak is the largest total between
its start and end.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

MARK_PREFIX = "dpplan::"


def enable_process_wide_accounting() -> bool:
    """Set c10's FLAGS_caffe2_report_cpu_memory_usage. False if the symbol is not found."""
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libc10.so", "libc10.dylib"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                flag = ctypes.c_bool.in_dll(ctypes.CDLL(path), "FLAGS_caffe2_report_cpu_memory_usage")
            except ValueError:
                return False
            flag.value = True
            return True
    return False


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """One allocation (positive) or free (negative) event."""

    time_ns: int
    delta_bytes: int
    total_bytes: int
    op_name: str


@dataclass(frozen=True, kw_only=True)
class MemoryTimeline:
    """Live CPU-tensor bytes over time, with the marked phases."""

    time_ns: np.ndarray
    total_bytes: np.ndarray
    marks: list[tuple[str, int, int]] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)

    def peak_between(self, start_ns: int, end_ns: int) -> int:
        inside = (self.time_ns >= start_ns) & (self.time_ns <= end_ns)
        before = self.time_ns < start_ns
        level_at_start = int(self.total_bytes[before][-1]) if before.any() else 0
        if not inside.any():
            return level_at_start
        return max(level_at_start, int(self.total_bytes[inside].max()))

    def level_at(self, time_ns: int) -> int:
        before = self.time_ns <= time_ns
        return int(self.total_bytes[before][-1]) if before.any() else 0

    def mark_spans(self, name: str) -> list[tuple[int, int]]:
        return [(start, end) for mark, start, end in self.marks if mark == name]


class CpuMemoryRecorder:
    """Start before anything is allocated; ``stop()`` returns the timeline."""

    def __init__(self, *, keep_allocations: bool = False):
        self.keep_allocations = keep_allocations
        self.process_wide = False
        self._profiler: profile | None = None

    def start(self) -> CpuMemoryRecorder:
        self.process_wide = enable_process_wide_accounting()
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    @staticmethod
    def mark(name: str):
        return record_function(MARK_PREFIX + name)

    def stop(self) -> MemoryTimeline:
        assert self._profiler is not None, "recorder was not started"
        self._profiler.__exit__(None, None, None)
        # The event tree is torch's private profiler API (checked in planner/torch_apis.py); its
        # stubs type each node's fields as a union of every kind, so it is read untyped here.
        kineto: Any = self._profiler.profiler
        tree = kineto.kineto_results.experimental_event_tree()
        times: list[int] = []
        totals: list[int] = []
        marks: list[tuple[str, int, int]] = []
        allocations: list[Allocation] = []
        stack = [(node, "") for node in tree]
        while stack:
            node, parent_name = stack.pop()
            fields: Any = node.extra_fields
            kind = type(fields).__name__
            if kind.endswith("Allocation"):
                times.append(node.start_time_ns)
                totals.append(fields.total_allocated)
                if self.keep_allocations:
                    allocations.append(
                        Allocation(
                            time_ns=node.start_time_ns,
                            delta_bytes=fields.alloc_size,
                            total_bytes=fields.total_allocated,
                            op_name=parent_name,
                        )
                    )
            elif node.name.startswith(MARK_PREFIX):
                marks.append((node.name[len(MARK_PREFIX):], node.start_time_ns, node.end_time_ns))
            stack.extend((child, node.name) for child in node.children)
        order = np.argsort(np.asarray(times, dtype=np.int64), kind="stable")
        allocations.sort(key=lambda a: a.time_ns)
        marks.sort(key=lambda m: m[1])
        return MemoryTimeline(
            time_ns=np.asarray(times, dtype=np.int64)[order],
            total_bytes=np.asarray(totals, dtype=np.int64)[order],
            marks=marks,
            allocations=allocations,
        )
