"""Peak CUDA allocator bytes per phase of the training step: forward, backward, optimizer.

torch's counters are exact and cheap: ``max_memory_allocated`` (bytes of live tensors, as the
allocator rounded them) and ``max_memory_reserved`` (segments the caching allocator holds);
``reset_peak_memory_stats`` sets both peaks to the current level. They are updated when an
allocation is requested on the host, so reading them needs no device synchronisation.
Each phase resets the peaks at its start and reads them at its end; a phase's peak is the
largest over the measured steps. What NVML sees beyond "reserved" (CUDA context, NCCL, other
processes) comes from profiler/gpu_sampler.py.
"""

from __future__ import annotations

import contextlib
import time

import torch

PHASES = ("forward", "backward", "optimizer")


class CudaPhaseMeter:
    """Drives ``run_training_step``'s hooks: ``mark`` as ``on_phase``, ``backward_starts`` as
    ``before_backward``. ``restart()`` forgets what was seen (after warm-up)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocated: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.points: list[tuple[float, int, int]] = []
        """(perf_counter s, allocated, reserved): the level at each phase's start and the phase's
        peak at its end, warm-up included; the report's torch line (profiler/memory_series.py)."""
        self._phase: str | None = None

    def restart(self) -> None:
        self.allocated.clear()
        self.reserved.clear()
        torch.cuda.reset_peak_memory_stats(self.device)

    def _begin(self, phase: str) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.points.append((
            time.perf_counter(), torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device),
        ))
        self._phase = phase

    def _end(self) -> None:
        if self._phase is None:
            return
        phase, self._phase = self._phase, None
        allocated = torch.cuda.max_memory_allocated(self.device)
        reserved = torch.cuda.max_memory_reserved(self.device)
        self.points.append((time.perf_counter(), allocated, reserved))
        self.allocated[phase] = max(self.allocated.get(phase, 0), allocated)
        self.reserved[phase] = max(self.reserved.get(phase, 0), reserved)

    @contextlib.contextmanager
    def mark(self, name: str):
        """``micro_batch`` starts the forward (the backward's end closes it); ``optimizer`` is its own phase."""
        self._begin("forward" if name == "micro_batch" else name)
        try:
            yield
        finally:
            self._end()

    def backward_starts(self) -> None:
        self._end()
        self._begin("backward")

    def result(self) -> dict:
        stats = torch.cuda.memory_stats(self.device)
        return {
            "peak_allocated_bytes": max(self.allocated.values(), default=0),
            "peak_reserved_bytes": max(self.reserved.values(), default=0),
            "phase_peak_allocated_bytes": {p: self.allocated[p] for p in PHASES if p in self.allocated},
            "phase_peak_reserved_bytes": {p: self.reserved[p] for p in PHASES if p in self.reserved},
            # Failed cudaMalloc calls that freed the cache and retried: the cheapest sign of a
            # run close to OOM (torchtitan DeviceMemoryMonitor, Composer memory_monitor).
            "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "num_ooms": int(stats.get("num_ooms", 0)),
        }
