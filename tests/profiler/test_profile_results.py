"""The merge of rank results into a run, on hand-made rank JSON (no launch, no GPU)."""

import importlib.util

import pytest
import torch

from dpplan.config import MIN_SAMPLE_HZ, ProfileConfig
from dpplan.profiler import profile_results
from dpplan.profiler.cuda_memory import CudaPhaseMeter
from dpplan.profiler.profile import skip_reason
from dpplan.profiler.profile_results import compare
from dpplan.training.batch_tokens import tokens_per_micro_batch
from tests.records import strategy_estimate

MiB = 1 << 20


def cuda_rank(rank, allocated, reserved, nvml, step_time_s):
    """The fields a cuda rank writes (worker._measure), numbers made up."""
    return {
        "rank": rank, "local_rank": rank, "status": "ok", "error": None,
        "peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved, "peak_nvml_bytes": nvml,
        "step_time_s": step_time_s, "samples_per_step": 4, "tokens_per_step": 4 * 512,
    }


def test_cuda_gaps_throughput_and_errors_are_named():
    results = [cuda_rank(0, 100 * MiB, 120 * MiB, 700 * MiB, 0.5), cuda_rank(1, 110 * MiB, 125 * MiB, 690 * MiB, 0.4)]
    summary = profile_results.measured_summary(results, num_replicas=2)
    measured = summary.to_json()
    assert measured["peak_allocated_bytes"] == 110 * MiB
    assert measured["peak_reserved_bytes"] == 125 * MiB
    assert measured["peak_nvml_bytes"] == 700 * MiB
    assert [r["allocator_cache_bytes"] for r in measured["per_rank"]] == [20 * MiB, 15 * MiB]
    assert [r["non_pytorch_bytes"] for r in measured["per_rank"]] == [580 * MiB, 565 * MiB]
    assert measured["step_time_s"] == 0.5  # the slowest rank sets the pace
    assert measured["samples_per_s"] == 4 * 2 / 0.5
    assert measured["tokens_per_s"] == 4 * 512 * 2 / 0.5

    estimate = strategy_estimate(peak_allocated_bytes=121 * MiB, peak_reserved_bytes=125 * MiB, peak_bytes=630 * MiB)
    entry = compare(summary, estimate, "cuda").to_json()
    assert entry["error_pct"] == pytest.approx(10.0)
    assert entry["errors_pct"] == pytest.approx({"allocated": 10.0, "reserved": 0.0, "nvml": -10.0})


def _outcome(results, expected=(0, 1), **kwargs):
    arguments = dict(strategy="ddp", batch_size=32, gpus=2, device="cuda", expected_ranks=list(expected),
                     results=results, returncode=1, timed_out=None, stderr_tail={}, launcher_tail="")
    arguments.update(kwargs)
    return profile_results.outcome(**arguments)


def test_the_earliest_failure_is_the_root_cause():
    results = {
        0: {"rank": 0, "status": "failed", "error": "RuntimeError: Connection closed by peer", "failed_at": 12.0},
        1: {"rank": 1, "status": "failed", "error": "model.py:9: ValueError: bad", "failed_at": 10.0},
    }
    assert _outcome(results) == ("failed", "rank 1 failed: model.py:9: ValueError: bad", 1)


def test_out_of_memory_on_any_rank_is_the_runs_status():
    results = {1: {"rank": 1, "status": "oom", "error": "OutOfMemoryError: CUDA out of memory", "failed_at": 1.0}}
    status, error, rank = _outcome(results)
    assert status == "oom" and rank == 1
    assert error == "batch 32 does not fit with ddp on 2 GPUs (rank 1: OutOfMemoryError: CUDA out of memory)"


def test_a_rank_without_result_is_named_with_its_last_stderr_line():
    results = {0: {"rank": 0, "status": "ok"}}
    status, error, rank = _outcome(results, stderr_tail={1: "Traceback...\nSegmentation fault"})
    assert (status, rank) == ("failed", 1)
    assert error == "rank 1 exited without a result: Segmentation fault"
    status, error, _ = _outcome({}, timed_out="the run did not finish within 5 s; its processes were stopped")
    assert status == "failed" and error.endswith("(no result from rank 0)")
    assert _outcome({0: {"rank": 0, "status": "ok"}, 1: {"rank": 1, "status": "ok"}}, returncode=0) == ("ok", None, None)


def test_token_rule():
    ids = torch.zeros(4, 128, dtype=torch.long)
    assert tokens_per_micro_batch({"pixel_values": torch.zeros(4, 3), "input_ids": ids, "labels": ids[:, :7]}) == 512
    assert tokens_per_micro_batch({"labels": ids[:, :7], "other": ids}) == 28  # first 2-D integer tensor
    assert tokens_per_micro_batch((torch.zeros(4, 16), ids)) == 512
    assert tokens_per_micro_batch(ids) == 512
    assert tokens_per_micro_batch(torch.zeros(4, 16)) is None  # features: no tokens
    assert tokens_per_micro_batch({"mask": torch.ones(4, 128, dtype=torch.bool)}) is None


def test_strategies_that_cannot_run_say_why():
    if importlib.util.find_spec("deepspeed") is None:
        assert "DeepSpeed is not installed" in skip_reason("zero2", 2)
    else:
        assert skip_reason("zero2", 2) is None
    assert "nn.DataParallel" in skip_reason("dp", 2)
    assert "--gpus 1" in skip_reason("single", 2)
    assert skip_reason("single", 1) is None and skip_reason("fsdp2", 8) is None
    assert skip_reason("single", 2, tp=2) is None and skip_reason("fsdp2", 4, tp=2) is None
    assert "--gpus 2 (= --tp)" in skip_reason("single", 4, tp=2)


def test_config_is_validated_once():
    with pytest.raises(ValueError, match="nodes > 1 needs rdzv_endpoint"):
        ProfileConfig(nodes=2)
    with pytest.raises(ValueError, match="does not split evenly"):
        ProfileConfig(gpus=3, nodes=2, rdzv_endpoint="h:1")
    with pytest.raises(ValueError, match="sample_hz"):
        ProfileConfig(sample_hz=10)


def test_sample_rate_floor_is_the_samplers():
    from dpplan.profiler.gpu_sampler import MIN_RATE_HZ

    assert MIN_SAMPLE_HZ == MIN_RATE_HZ


def test_cuda_phase_meter_reads_each_phase(monkeypatch):
    """The meter's bookkeeping with torch.cuda's counters replaced by a scripted allocator."""
    level = {"now": 0, "peak": 0}

    def allocate(nbytes):
        level["now"] += nbytes
        level["peak"] = max(level["peak"], level["now"])

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: level.update(peak=level["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: level["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: level["peak"] + 2 * MiB)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"num_alloc_retries": 1})
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: level["now"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: level["now"] + 2 * MiB)
    meter = CudaPhaseMeter(torch.device("cuda", 0))
    allocate(10 * MiB)  # parameters
    with meter.mark("micro_batch"):
        allocate(5 * MiB)  # activations
        meter.backward_starts()
        allocate(3 * MiB)
        allocate(-8 * MiB)  # activations freed, gradients stay
        allocate(-2 * MiB)
    with meter.mark("optimizer"):
        allocate(4 * MiB)
    result = meter.result()
    assert result["phase_peak_allocated_bytes"] == {"forward": 15 * MiB, "backward": 18 * MiB, "optimizer": 12 * MiB}
    assert result["peak_allocated_bytes"] == 18 * MiB and result["peak_reserved_bytes"] == 20 * MiB
    assert result["num_alloc_retries"] == 1
    # The memory-over-time points: each phase's starting level, then its peak, in time order.
    assert [(a // MiB, r // MiB) for _, a, r in meter.points] == [(10, 12), (15, 17), (15, 17), (18, 20), (8, 10), (12, 14)]
    times = [t for t, _, _ in meter.points]
    assert times == sorted(times)


def test_gpus_found_pick_the_estimates_gpu(monkeypatch):
    from dpplan.profiler import target as targets

    found = {"count": 4, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 85520809984}
    monkeypatch.setattr(targets, "detect_gpus", lambda: found)
    target = targets.resolve_target(ProfileConfig())
    assert (target.device, target.gpus, target.gpu, target.notices) == ("cuda", 4, "h100-80gb", ())
    assert targets.resolve_target(ProfileConfig(gpus=8, nodes=2, rdzv_endpoint="node0:29400")).gpus == 8
    with pytest.raises(ValueError, match="needs 8 GPUs per node; 4 visible"):
        targets.resolve_target(ProfileConfig(gpus=16, nodes=2, rdzv_endpoint="node0:29400"))
    assert targets.resolve_target(ProfileConfig(device="cpu")).device == "cpu"
    found["name"] = "NVIDIA GeForce GTX 1080"
    target = targets.resolve_target(ProfileConfig())
    assert target.gpu == "h100-80gb" and "not in dpplan's GPU catalog" in target.notices[0]


def test_out_of_memory_is_recognised():
    from dpplan.profiler.worker import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_out_of_memory(RuntimeError("boom"))


def test_a_saved_profile_reads_back_to_the_same_json(cpu_profile):
    """``dpplan report`` draws ProfileDocument.from_json(profile.json): nothing lost, nothing reordered."""
    import json

    from dpplan.profiler.profile_document import ProfileDocument

    assert cpu_profile.exit_code == 0, cpu_profile.output
    document = cpu_profile.document
    assert json.dumps(ProfileDocument.from_json(document).to_json()) == json.dumps(document)
    interrupted = {**document, "interrupted": True}
    del interrupted["recommendations"]  # an interrupted profile has none, and writes no key
    assert json.dumps(ProfileDocument.from_json(interrupted).to_json()) == json.dumps(interrupted)
