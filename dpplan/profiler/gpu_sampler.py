"""Device memory and utilisation of this rank's GPU, sampled through NVML in a thread.

Why NVML at all when torch has exact allocator counters: NVML also sees the CUDA context,
NCCL buffers and anything else outside the caching allocator (shared research note
profilers.md §2 of the key findings), so the worker reports both and names the gap.

Why memory v2: ``nvmlDeviceGetMemoryInfo`` defaults to the v1 struct, whose ``used`` is
"Sum of Reserved and Allocated" (NVML doc, ``nvmlMemory_t``); an idle A100 then shows
~912 MB used (rust-nvml/nvml-wrapper#57). v2 reports the driver-reserved part apart.

Why per-device and not per-process: per-process ``usedGpuMemory`` is N/A under MIG and
WDDM and carries host PIDs inside containers (nvitop ``device.py``; NVIDIA/nvidia-docker
#1483), and listing processes costs ~4.5 ms and takes the driver's global lock
(flightlessmango/MangoHud#2104). It is queried once, at ``stop()``, as optional detail.

The sampler never raises because NVML is missing or misbehaves: it reports
``available=False`` with a one-line ``notice`` and the run falls back to torch's counters.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_RATE_HZ = 100.0
# Issue #3: slower than 50 Hz misses allocation spikes of a few steps' length.
MIN_RATE_HZ = 50.0
NO_NVML_FALLBACK = "GPU memory from torch's counters only"
# CUDA_VISIBLE_DEVICES entries that name a device by UUID rather than by index
# (CUDA programming guide, "CUDA Environment Variables").
UUID_PREFIXES = ("GPU-", "MIG-")


@dataclass(frozen=True)
class GpuSample:
    """One NVML reading of the rank's device."""

    time_s: float  # time.perf_counter() when taken
    used_bytes: int  # v2 "used": allocated device memory, driver-reserved excluded
    reserved_bytes: int  # v2 "reserved": driver/firmware memory; 0 on the v1 fallback
    total_bytes: int
    gpu_util_pct: int | None  # NVML's kernel-busy percentage; None where unsupported (MIG)


def parse_visible_devices(visible: str | None) -> list[int | str] | None:
    """The devices CUDA_VISIBLE_DEVICES makes visible, in CUDA order; None when unset.

    CUDA reads the list up to the first invalid entry and ignores the rest (CUDA
    programming guide, CUDA_VISIBLE_DEVICES); a repeated entry hides every device
    (comment in torch ``cuda/__init__.py::_parse_visible_devices``).
    """
    if visible is None:
        return None
    devices: list[int | str] = []
    for entry in visible.split(","):
        entry = entry.strip()
        if entry.startswith(UUID_PREFIXES):
            device: int | str = entry
        elif entry.isdigit():
            device = int(entry)
        else:
            break
        if device in devices:
            return []
        devices.append(device)
    return devices


def nvml_device_for(local_rank: int, visible: str | None) -> int | str:
    """The NVML index (or GPU-/MIG- UUID) of the device that local rank ``local_rank`` uses.

    NVML ignores CUDA_VISIBLE_DEVICES, so local rank r is the r-th visible device. Raises
    ``ValueError`` when the rank has no visible device.
    """
    if local_rank < 0:
        raise ValueError(f"local_rank must be >= 0 (got {local_rank})")
    devices = parse_visible_devices(visible)
    if devices is None:
        return local_rank
    if local_rank >= len(devices):
        raise ValueError(
            f"LOCAL_RANK={local_rank} but CUDA_VISIBLE_DEVICES={visible!r} "
            f"makes {len(devices)} device(s) visible"
        )
    return devices[local_rank]


def samples_between(samples: list[GpuSample], start_s: float, end_s: float) -> list[GpuSample]:
    """The samples taken in [start_s, end_s] (perf_counter seconds); samples are in time order."""
    low = bisect.bisect_left(samples, start_s, key=lambda sample: sample.time_s)
    high = bisect.bisect_right(samples, end_s, key=lambda sample: sample.time_s)
    return samples[low:high]


def summarize_samples(samples: list[GpuSample]) -> dict:
    """Peaks, capacity, mean utilisation and the achieved rate; None values without samples."""
    if not samples:
        return {
            "peak_used_bytes": None,
            "peak_reserved_bytes": None,
            "total_bytes": None,
            "mean_gpu_util_pct": None,
            "num_samples": 0,
            "rate_hz": None,
        }
    utils = [sample.gpu_util_pct for sample in samples if sample.gpu_util_pct is not None]
    span_s = samples[-1].time_s - samples[0].time_s
    return {
        "peak_used_bytes": max(sample.used_bytes for sample in samples),
        "peak_reserved_bytes": max(sample.reserved_bytes for sample in samples),
        "total_bytes": samples[-1].total_bytes,
        "mean_gpu_util_pct": statistics.fmean(utils) if utils else None,
        "num_samples": len(samples),
        # n samples span n - 1 intervals; one sample has no rate.
        "rate_hz": (len(samples) - 1) / span_s if span_s > 0 else None,
    }


def _describe(error: BaseException) -> str:
    # pynvml's NVMLError.__str__ asks the library for the message; never let that raise here.
    try:
        return str(error) or type(error).__name__
    except Exception:
        return type(error).__name__


class GpuSampler:
    """Samples the rank's GPU at ``rate_hz`` between ``start()`` and ``stop()``.

    ``nvml`` is the pynvml module (``nvidia-ml-py``); tests inject a fake. NVML is
    initialised here so that ``available`` and ``notice`` are known before the run starts.
    ``notice`` is one line: why NVML is unavailable, or a caveat on the numbers when it is.
    """

    def __init__(self, local_rank: int, rate_hz: float = DEFAULT_RATE_HZ, nvml=None):
        if not (math.isfinite(rate_hz) and rate_hz >= MIN_RATE_HZ):
            raise ValueError(f"rate_hz must be a number >= {MIN_RATE_HZ:g} Hz (got {rate_hz!r})")
        self.local_rank = local_rank
        self.rate_hz = float(rate_hz)
        self.available = False
        self.notice: str | None = None
        self.device_description: str | None = None
        # Per-process detail, read once at stop(); None where NVML cannot say (see module doc).
        self.process_used_bytes: int | None = None
        self.num_failed_samples = 0
        self._nvml: Any = None
        """pynvml, or the test double given as ``nvml``; None when closed or NVML is unavailable."""
        self._handle = None
        self._memory_version = None
        self._samples: list[GpuSample] = []
        # Held until stop(); the thread paces itself with a timed acquire of it, which
        # returns True the moment stop() releases it. Same semantics as Event.wait(timeout)
        # at ~70 µs instead of ~100 µs of CPU per wake-up (Event.wait is a Condition.wait
        # that allocates and juggles a second lock each call; measured on the 2-core dev
        # VM, 4 x 200 waits of 10 ms each, thread_time per wait: 72 vs 100 µs, sleep 50 µs).
        self._stop_lock = threading.Lock()
        self._stop_lock.acquire()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._open(nvml)

    # -- set-up -----------------------------------------------------------------------

    def _open(self, nvml) -> None:
        if nvml is None:
            try:
                import pynvml
            except ImportError:
                self.notice = f"NVML unavailable (nvidia-ml-py not installed): {NO_NVML_FALLBACK}"
                return
            nvml = pynvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            self.notice = f"NVML unavailable ({_describe(error)}): {NO_NVML_FALLBACK}"
            return
        self._nvml = nvml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            device = nvml_device_for(self.local_rank, visible)
        except ValueError as error:
            self._close(f"no NVML device for this rank ({error}): {NO_NVML_FALLBACK}")
            return
        try:
            if isinstance(device, str):
                self._handle = nvml.nvmlDeviceGetHandleByUUID(device)
            else:
                self._handle = nvml.nvmlDeviceGetHandleByIndex(device)
            self._memory_version = self._probe_memory_version()
        except nvml.NVMLError as error:
            self._close(f"NVML device {device!r} unusable ({_describe(error)}): {NO_NVML_FALLBACK}")
            return
        self.available = True
        self.device_description = self._describe_device(device)
        if self._memory_version is None:
            self.notice = (
                "NVML memory v2 unsupported by this driver (< 515): "
                "used_bytes includes driver-reserved memory"
            )
        elif isinstance(device, int) and self._order_is_ambiguous():
            self.notice = (
                "GPU models differ on this node and CUDA_DEVICE_ORDER is not PCI_BUS_ID: "
                "CUDA's device order may not be NVML's; set CUDA_DEVICE_ORDER=PCI_BUS_ID"
            )

    def _probe_memory_version(self):
        """nvmlMemory_v2 if the driver has it, else None (v1); raises if memory is unreadable."""
        nvml = self._nvml
        try:
            nvml.nvmlDeviceGetMemoryInfo(self._handle, version=nvml.nvmlMemory_v2)
            return nvml.nvmlMemory_v2
        except nvml.NVMLError as error:
            # Drivers before 515 lack nvmlDeviceGetMemoryInfo_v2; gpustat and nvitop fall
            # back to v1 the same way (profilers.md §1.2).
            if getattr(error, "value", None) != getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", object()):
                raise
        nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return None

    def _describe_device(self, device: int | str) -> str:
        nvml = self._nvml
        try:
            name = nvml.nvmlDeviceGetName(self._handle)
        except nvml.NVMLError:
            name = "unknown GPU"
        if isinstance(device, int):
            return f"{name} (NVML index {device})"
        try:
            return f"{name} (NVML index {nvml.nvmlDeviceGetIndex(self._handle)}, {device})"
        except nvml.NVMLError:  # MIG device handles have no index of their own
            return f"{name} ({device})"

    def _order_is_ambiguous(self) -> bool:
        """True when CUDA's default FASTEST_FIRST order can differ from NVML's PCI bus order.

        CUDA enumerates the fastest device first unless CUDA_DEVICE_ORDER=PCI_BUS_ID (CUDA
        programming guide, CUDA_DEVICE_ORDER); NVML always uses PCI bus order. With
        identical GPUs both orders agree, so only a mixed node is worth a notice.
        """
        if os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
            return False
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
            names = {nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)}
        except nvml.NVMLError:
            return False
        return len(names) > 1

    def _close(self, notice: str | None = None) -> None:
        if notice is not None:
            self.notice = notice
            self.available = False
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> GpuSampler:
        if self.available and self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="dpplan-gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> list[GpuSample]:
        """Stop and join the thread, shut NVML down, return the samples. Safe to call twice."""
        if self._stopped:
            return self._samples
        self._stopped = True
        self._stop_lock.release()
        if self._thread is not None:
            self._thread.join()
        if self.available:
            self.process_used_bytes = self._own_process_bytes()
            if self.num_failed_samples and self.notice is None:
                self.notice = f"{self.num_failed_samples} NVML memory reads failed and were skipped"
        self._close()
        return self._samples

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- sampling ---------------------------------------------------------------------

    def _run(self) -> None:
        # Everything the loop touches is bound to locals once: each sample is then two
        # NVML calls, one dataclass and one list append (atomic under the GIL, no lock).
        nvml = self._nvml
        handle = self._handle
        error_type = nvml.NVMLError
        read_memory = nvml.nvmlDeviceGetMemoryInfo
        if self._memory_version is not None:
            read_memory = functools.partial(read_memory, version=self._memory_version)
        read_util = nvml.nvmlDeviceGetUtilizationRates
        append = self._samples.append
        clock = time.perf_counter
        wait_for_stop = self._stop_lock.acquire
        interval_s = 1.0 / self.rate_hz
        util_supported = True
        next_s = clock()
        while True:
            now_s = clock()
            try:
                memory = read_memory(handle)
            except error_type:
                self.num_failed_samples += 1
            else:
                util_pct = None
                if util_supported:
                    try:
                        util_pct = int(read_util(handle).gpu)
                    except error_type:
                        util_supported = False  # NotSupported on MIG; asking again costs a call
                append(GpuSample(
                    now_s,
                    int(memory.used),
                    int(getattr(memory, "reserved", 0)),
                    int(memory.total),
                    util_pct,
                ))
            # Pace on a fixed grid so the rate does not drift by the cost of each sample;
            # after a stall (GIL, preemption) restart the grid instead of bursting to catch up.
            next_s += interval_s
            delay_s = next_s - clock()
            if delay_s < 0:
                next_s = clock()
                delay_s = 0.0
            if wait_for_stop(timeout=delay_s):
                return

    def _own_process_bytes(self) -> int | None:
        nvml = self._nvml
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            # Optional detail, so any failure is ignored: besides NVMLError, pynvml raises a
            # plain NVMLLibraryMismatchError when the binding is newer than the driver.
            return None
        pid = os.getpid()
        for process in processes:
            if getattr(process, "pid", None) == pid:
                used = getattr(process, "usedGpuMemory", None)
                return int(used) if used is not None else None
        return None
