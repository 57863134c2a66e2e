"""The NVML sampler against a scripted fake pynvml, plus the real pynvml on this machine.

Timing checks are deliberately loose (a 2-core CI box may stall the thread): they ask for
"enough" samples, never for exact counts or intervals.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from dpplan.profiler.gpu_sampler import (
    NO_NVML_FALLBACK,
    GpuSample,
    GpuSampler,
    nvml_device_for,
    parse_visible_devices,
    samples_between,
    summarize_samples,
)

GIB = 1024**3


class FakeNvml:
    """The slice of pynvml the sampler calls; values scripted per device, calls recorded."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    nvmlMemory_v2 = 0x02000028  # pynvml's value: sizeof(c_nvmlMemory_v2_t) | 2 << 24

    class NVMLError(Exception):
        def __init__(self, value: int, message: str = "fake NVML error"):
            super().__init__(message)
            self.value = value

    def __init__(self, devices=None, *, init_error=None, processes=None, process_error=None,
                 util_error=None, v2_missing=False, memory_error_after=None):
        # devices: list of dicts with name, uuid, memory (list of (used, reserved, total)).
        self.devices = devices or [fake_device("NVIDIA H100 80GB HBM3", "GPU-0000")]
        self.init_error = init_error
        self.processes = processes
        self.process_error = process_error
        self.util_error = util_error
        self.v2_missing = v2_missing
        self.memory_error_after = memory_error_after
        self.calls: list[tuple] = []
        self.memory_reads = 0
        self.num_inits = 0
        self.num_shutdowns = 0

    def nvmlInit(self):
        self.calls.append(("nvmlInit",))
        if self.init_error is not None:
            raise self.init_error
        self.num_inits += 1

    def nvmlShutdown(self):
        self.calls.append(("nvmlShutdown",))
        self.num_shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        self.calls.append(("nvmlDeviceGetHandleByIndex", index))
        if not 0 <= index < len(self.devices):
            raise self.NVMLError(2, "Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls.append(("nvmlDeviceGetHandleByUUID", uuid))
        for index, device in enumerate(self.devices):
            if device["uuid"] == uuid:
                return index
        raise self.NVMLError(6, "Not Found")

    def nvmlDeviceGetName(self, handle):
        return self.devices[handle]["name"]

    def nvmlDeviceGetIndex(self, handle):
        if self.devices[handle]["uuid"].startswith("MIG-"):
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED, "Not Supported")
        return handle

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        self.calls.append(("nvmlDeviceGetMemoryInfo", handle, version))
        if version is not None and self.v2_missing:
            raise self.NVMLError(self.NVML_ERROR_FUNCTION_NOT_FOUND, "Function Not Found")
        if self.memory_error_after is not None and self.memory_reads >= self.memory_error_after:
            raise self.NVMLError(15, "GPU is lost")
        script = self.devices[handle]["memory"]
        used, reserved, total = script[min(self.memory_reads, len(script) - 1)]
        self.memory_reads += 1
        if version is None:  # v1: used includes reserved, no reserved field
            return SimpleNamespace(total=total, free=total - used - reserved, used=used + reserved)
        return SimpleNamespace(total=total, reserved=reserved, free=total - used - reserved, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self.calls.append(("nvmlDeviceGetUtilizationRates", handle))
        if self.util_error is not None:
            raise self.util_error
        return SimpleNamespace(gpu=self.devices[handle].get("util", 50), memory=10)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self.calls.append(("nvmlDeviceGetComputeRunningProcesses", handle))
        if self.process_error is not None:
            raise self.process_error
        return self.processes or []

    def count(self, name: str) -> int:
        return sum(1 for call in self.calls if call[0] == name)


def fake_device(name, uuid, memory=None, util=50):
    return {"name": name, "uuid": uuid, "memory": memory or [(1 * GIB, 512 * 2**20, 80 * GIB)], "util": util}


def sample_for(sampler: GpuSampler, seconds: float, min_samples: int = 1) -> list[GpuSample]:
    """Sample for ``seconds``, and on a stalled box longer, until ``min_samples`` are in."""
    deadline = time.perf_counter() + 10.0
    with sampler:
        time.sleep(seconds)
        while sampler.available and len(sampler._samples) < min_samples and time.perf_counter() < deadline:
            time.sleep(0.01)
    return sampler.stop()  # stop() after __exit__ returns the same list


@pytest.fixture(autouse=True)
def clean_cuda_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


# -- CUDA_VISIBLE_DEVICES -> NVML device --------------------------------------------------


def test_without_cuda_visible_devices_the_local_rank_is_the_nvml_index():
    assert nvml_device_for(0, None) == 0
    assert nvml_device_for(5, None) == 5


def test_indices_select_the_rth_visible_device():
    assert nvml_device_for(0, "3,1") == 3
    assert nvml_device_for(1, "3,1") == 1
    assert nvml_device_for(1, " 6 , 7 ") == 7


def test_uuids_are_returned_for_lookup_by_uuid():
    visible = "GPU-aaaa-1111,GPU-bbbb-2222"
    assert nvml_device_for(1, visible) == "GPU-bbbb-2222"
    mig = "MIG-5c89852c-d268-c3f3-1b07-005d5ae1dc3f"
    assert nvml_device_for(0, mig) == mig


def test_list_is_cut_at_the_first_invalid_entry_as_cuda_does():
    assert parse_visible_devices("0,junk,2") == [0]
    assert nvml_device_for(0, "0,junk,2") == 0
    with pytest.raises(ValueError, match="LOCAL_RANK=1"):
        nvml_device_for(1, "0,junk,2")


@pytest.mark.parametrize("visible", ["", "-1", "NoDevFiles", "0,0"])
def test_lists_that_hide_every_device(visible):
    assert parse_visible_devices(visible) == []
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        nvml_device_for(0, visible)


def test_negative_local_rank_is_rejected():
    with pytest.raises(ValueError, match="local_rank"):
        nvml_device_for(-1, None)


def test_sampler_opens_the_visible_device_by_index(monkeypatch):
    devices = [fake_device("NVIDIA A100-SXM4-80GB", f"GPU-{i}") for i in range(4)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    nvml = FakeNvml(devices)
    sampler = GpuSampler(local_rank=1, nvml=nvml)
    assert sampler.available
    assert ("nvmlDeviceGetHandleByIndex", 3) in nvml.calls
    assert sampler.device_description == "NVIDIA A100-SXM4-80GB (NVML index 3)"
    sampler.stop()


def test_sampler_opens_uuids_with_get_handle_by_uuid(monkeypatch):
    mig = "MIG-5c89852c-d268-c3f3-1b07-005d5ae1dc3f"
    devices = [fake_device("NVIDIA H100 80GB HBM3", "GPU-aaaa"), fake_device("NVIDIA H100 80GB HBM3 MIG 1g.10gb", mig)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{mig},GPU-aaaa")
    nvml = FakeNvml(devices)
    first = GpuSampler(local_rank=0, nvml=nvml)
    second = GpuSampler(local_rank=1, nvml=nvml)
    assert ("nvmlDeviceGetHandleByUUID", mig) in nvml.calls
    assert ("nvmlDeviceGetHandleByUUID", "GPU-aaaa") in nvml.calls
    assert nvml.count("nvmlDeviceGetHandleByIndex") == 0
    assert first.device_description == f"NVIDIA H100 80GB HBM3 MIG 1g.10gb ({mig})"
    assert second.device_description == "NVIDIA H100 80GB HBM3 (NVML index 0, GPU-aaaa)"
    first.stop(), second.stop()


def test_unknown_uuid_gives_a_notice(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-not-here")
    nvml = FakeNvml()
    sampler = GpuSampler(local_rank=0, nvml=nvml)
    assert not sampler.available
    assert "GPU-not-here" in sampler.notice and "Not Found" in sampler.notice
    assert nvml.num_shutdowns == nvml.num_inits == 1  # init is balanced even on failure
    assert sampler.start().stop() == []


def test_rank_beyond_the_visible_devices_gives_a_notice(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    sampler = GpuSampler(local_rank=1, nvml=FakeNvml())
    assert not sampler.available
    assert "LOCAL_RANK=1" in sampler.notice
    assert sampler.stop() == []


def test_mixed_gpu_models_ask_for_pci_bus_order(monkeypatch):
    devices = [fake_device("NVIDIA A100-PCIE-40GB", "GPU-0"), fake_device("NVIDIA H100 PCIe", "GPU-1")]
    sampler = GpuSampler(local_rank=0, nvml=FakeNvml(devices))
    assert sampler.available
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in sampler.notice
    sampler.stop()
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    sampler = GpuSampler(local_rank=0, nvml=FakeNvml(devices))
    assert sampler.notice is None
    sampler.stop()


# -- sampling -------------------------------------------------------------------------------


def test_samples_follow_the_scripted_memory_values():
    script = [(g * GIB, 500 * 2**20, 80 * GIB) for g in (1, 2, 5, 3)]
    nvml = FakeNvml([fake_device("NVIDIA H100 80GB HBM3", "GPU-0", memory=script, util=87)])
    samples = sample_for(GpuSampler(local_rank=0, rate_hz=200, nvml=nvml), 0.1, min_samples=len(script) + 2)

    used = [sample.used_bytes for sample in samples]
    positions = [[row[0] for row in script].index(value) for value in used]
    assert positions == sorted(positions)  # the script is walked in order
    assert used[-1] == 3 * GIB  # ...to its end
    assert all(sample.reserved_bytes == 500 * 2**20 for sample in samples)
    assert all(sample.total_bytes == 80 * GIB for sample in samples)
    assert all(sample.gpu_util_pct == 87 for sample in samples)
    times = [sample.time_s for sample in samples]
    assert times == sorted(times)
    summary = summarize_samples(samples)
    assert summary["peak_used_bytes"] == 5 * GIB
    assert summary["peak_reserved_bytes"] == 500 * 2**20
    assert summary["total_bytes"] == 80 * GIB
    assert summary["mean_gpu_util_pct"] == 87
    assert summary["num_samples"] == len(samples)


def test_every_memory_read_asks_for_v2():
    nvml = FakeNvml()
    samples = sample_for(GpuSampler(local_rank=0, nvml=nvml), 0.1)
    memory_calls = [call for call in nvml.calls if call[0] == "nvmlDeviceGetMemoryInfo"]
    assert len(memory_calls) == len(samples) + 1  # + the probe at construction
    assert all(call[2] == FakeNvml.nvmlMemory_v2 for call in memory_calls)
    assert samples[0].used_bytes == 1 * GIB  # v2 "used", reserved apart
    assert samples[0].reserved_bytes == 512 * 2**20


def test_drivers_without_v2_fall_back_to_v1_with_a_notice():
    nvml = FakeNvml(v2_missing=True)
    sampler = GpuSampler(local_rank=0, nvml=nvml)
    assert sampler.available
    assert "v2" in sampler.notice
    samples = sample_for(sampler, 0.1)
    assert samples and all(sample.reserved_bytes == 0 for sample in samples)
    assert samples[0].used_bytes == 1 * GIB + 512 * 2**20  # v1 lumps reserved into used


def test_rate_is_roughly_the_requested_one():
    samples = sample_for(GpuSampler(local_rank=0, rate_hz=100, nvml=FakeNvml()), 0.5)
    # 50 expected; a loaded 2-core box may stall the thread, so ask for half.
    assert len(samples) >= 25
    assert summarize_samples(samples)["rate_hz"] < 150  # paced, not spinning


def test_rate_below_50_hz_is_rejected():
    with pytest.raises(ValueError, match="rate_hz"):
        GpuSampler(local_rank=0, rate_hz=10, nvml=FakeNvml())
    with pytest.raises(ValueError, match="rate_hz"):
        GpuSampler(local_rank=0, rate_hz=float("nan"), nvml=FakeNvml())


def test_unsupported_utilisation_is_none_and_asked_once():
    nvml = FakeNvml(util_error=FakeNvml.NVMLError(FakeNvml.NVML_ERROR_NOT_SUPPORTED, "Not Supported"))
    samples = sample_for(GpuSampler(local_rank=0, nvml=nvml), 0.1)
    assert samples and all(sample.gpu_util_pct is None for sample in samples)
    assert nvml.count("nvmlDeviceGetUtilizationRates") == 1
    assert summarize_samples(samples)["mean_gpu_util_pct"] is None


def test_failed_reads_mid_run_are_skipped_and_counted():
    nvml = FakeNvml(memory_error_after=4)
    sampler = GpuSampler(local_rank=0, nvml=nvml)
    with sampler:
        deadline = time.perf_counter() + 10.0
        while sampler.num_failed_samples < 2 and time.perf_counter() < deadline:
            time.sleep(0.01)
    samples = sampler.stop()
    assert len(samples) == 3  # reads 2-4; read 1 was the probe
    assert sampler.num_failed_samples > 0
    assert "failed" in sampler.notice


# -- per-process detail ---------------------------------------------------------------------


def test_own_process_bytes_are_read_at_stop():
    processes = [SimpleNamespace(pid=1, usedGpuMemory=7), SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * GIB)]
    nvml = FakeNvml(processes=processes)
    sampler = GpuSampler(local_rank=0, nvml=nvml)
    sample_for(sampler, 0.05)
    assert sampler.process_used_bytes == 3 * GIB
    assert nvml.count("nvmlDeviceGetComputeRunningProcesses") == 1  # never in the hot loop


@pytest.mark.parametrize("error", [
    FakeNvml.NVMLError(FakeNvml.NVML_ERROR_NOT_SUPPORTED, "Not Supported"),  # MIG
    RuntimeError("NVMLLibraryMismatchError stand-in"),  # pynvml's non-NVMLError
])
def test_per_process_failures_are_ignored(error):
    sampler = GpuSampler(local_rank=0, nvml=FakeNvml(process_error=error))
    samples = sample_for(sampler, 0.05)
    assert samples
    assert sampler.process_used_bytes is None
    assert sampler.notice is None


def test_per_process_memory_not_available_is_none():
    # pynvml turns NVML_VALUE_NOT_AVAILABLE (MIG, WDDM) into None; inside a container our
    # PID is not in the list at all.
    processes = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)]
    sampler = GpuSampler(local_rank=0, nvml=FakeNvml(processes=processes))
    sample_for(sampler, 0.05)
    assert sampler.process_used_bytes is None


# -- NVML missing ---------------------------------------------------------------------------


def test_init_failure_gives_a_one_line_notice_and_no_samples():
    error = FakeNvml.NVMLError(FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found")
    nvml = FakeNvml(init_error=error)
    sampler = GpuSampler(local_rank=0, nvml=nvml)
    assert not sampler.available
    assert sampler.notice == (
        "NVML unavailable (NVML Shared Library Not Found): GPU memory from torch's counters only"
    )
    assert sampler.device_description is None
    with sampler:
        time.sleep(0.02)
    assert sampler.stop() == []
    assert nvml.num_shutdowns == 0  # nothing to shut down
    assert summarize_samples([])["num_samples"] == 0


def test_lifecycle_is_idempotent_and_balanced():
    nvml = FakeNvml()
    sampler = GpuSampler(local_rank=0, nvml=nvml)
    sampler.start()
    sampler.start()  # a second start does not start a second thread
    time.sleep(0.05)
    first = sampler.stop()
    assert sampler.stop() is first
    assert nvml.num_inits == nvml.num_shutdowns == 1
    assert sampler._thread is not None and not sampler._thread.is_alive()
    assert sampler._thread.daemon


def test_the_real_pynvml_never_raises():
    """The sampler agrees with the real library: where nvmlInit fails (no driver, as on this CI
    machine) it is unavailable, names NVML's own error in a one-line notice, starts no thread and
    falls back to torch's counters; where NVML sees a GPU it samples."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        init_error, num_devices = str(error), 0
    else:
        init_error, num_devices = None, pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    sampler = GpuSampler(local_rank=0)
    samples = sample_for(sampler, 0.1)
    assert sampler.available == (num_devices > 0)
    if sampler.available:
        assert samples and samples[0].total_bytes > 0
    else:
        assert samples == [] and sampler._thread is None
        assert sampler.notice.endswith(f": {NO_NVML_FALLBACK}") and "\n" not in sampler.notice
        if init_error is not None:
            assert sampler.notice == f"NVML unavailable ({init_error}): {NO_NVML_FALLBACK}"


# -- summaries ------------------------------------------------------------------------------


def test_summary_of_no_samples_is_none_valued():
    assert summarize_samples([]) == {
        "peak_used_bytes": None,
        "peak_reserved_bytes": None,
        "total_bytes": None,
        "mean_gpu_util_pct": None,
        "num_samples": 0,
        "rate_hz": None,
    }


def test_samples_between_is_inclusive_and_per_phase_peaks_work():
    samples = [GpuSample(t, used, 0, 100, 10) for t, used in [(0.0, 5), (0.1, 9), (0.2, 7), (0.3, 2)]]
    phase = samples_between(samples, 0.1, 0.2)
    assert [sample.used_bytes for sample in phase] == [9, 7]
    assert summarize_samples(phase)["peak_used_bytes"] == 9
    assert summarize_samples(phase)["rate_hz"] == pytest.approx(10.0)
    assert samples_between(samples, 0.31, 1.0) == []
    assert summarize_samples(samples[:1])["rate_hz"] is None
