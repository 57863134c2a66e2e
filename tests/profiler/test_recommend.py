"""Recommendations: calibration, offload and the fastest strategy on tiny_gpt's real estimates,
and one end-to-end batch-size search with real torchrun trials on CPU ranks."""

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from dpplan.cli import main
from dpplan.config import ProfileConfig, RunSpec
from dpplan.profiler import recommend as rec
from dpplan.profiler.batch_search import judge
from dpplan.profiler.profile import Target, estimate_function
from dpplan.profiler.profile_results import Measured, RunResult
from tests.records import run_settings, strategy_estimate

MiB = 1 << 20


def _estimate_at(model, device, strategies=("ddp",), gpus=2):
    config = ProfileConfig(run=RunSpec(model=model), strategies=strategies, gpus=gpus, device=device)
    target = Target(device=device, gpus=gpus, gpu="h100-80gb" if device == "cuda" else None, description="",
                    notices=())
    return estimate_function(config, target)


def _run(strategy, batch_size, status, estimate, measured=None, offload="none"):
    return RunResult(settings=run_settings(strategy=strategy, batch_size=batch_size, offload=offload), status=status,
                     estimate=estimate, measured=Measured(**measured) if measured is not None else None)


@pytest.fixture(scope="module")
def cpu_estimates():
    from tests.conftest import FIXTURES

    return _estimate_at(str(FIXTURES / "tiny_gpt.py"), "cpu")


def test_fit_bytes_are_what_must_fit_on_the_card():
    estimate = strategy_estimate(peak_bytes=900 * MiB, peak_reserved_bytes=400 * MiB)
    measured = Measured(peak_allocated_bytes=300 * MiB, peak_reserved_bytes=420 * MiB, peak_nvml_bytes=950 * MiB)
    assert rec.fit_bytes(measured, estimate, "cuda") == (950 * MiB, "NVML used")
    without_nvml = replace(measured, peak_nvml_bytes=None)
    assert rec.fit_bytes(without_nvml, estimate, "cuda") == (920 * MiB, "reserved + estimated context and NCCL")
    assert rec.fit_bytes(measured, estimate, "cpu") == (300 * MiB, "tensor bytes")


def test_calibration_scales_the_estimate_by_what_was_measured(cpu_estimates):
    estimate = cpu_estimates("ddp", batch_size=2)
    run = _run("ddp", 2, "ok", estimate, {"peak_allocated_bytes": int(estimate.peak_bytes * 1.1)})
    calib = rec.calibration(run, "cpu").to_json()
    assert calib["ratio"] == pytest.approx(1.1, rel=1e-6) and calib["batch_size"] == 2
    assert rec.calibration(replace(run, status="oom"), "cpu") is None
    # The largest b with estimate(b) x ratio <= limit, checked against the planner's own peaks.
    limit = int(cpu_estimates("ddp", batch_size=6).peak_bytes * 1.1) + 1
    predicted = rec.predicted_max_batch(cpu_estimates, "ddp", limit, calib["ratio"])
    assert predicted == 6
    assert rec.predicted_max_batch(cpu_estimates, "ddp", limit, 1.0) > 6  # uncalibrated: too optimistic


def test_predicted_only_without_trials(cpu_estimates):
    estimate = cpu_estimates("ddp", batch_size=1)
    limit = cpu_estimates("ddp", batch_size=4).peak_bytes
    limits = rec.Limits(capacity_bytes=int(limit / 0.9) + 1, headroom_pct=10.0, capacity_source="test")
    run = _run("ddp", 1, "ok", estimate, {"peak_allocated_bytes": estimate.peak_bytes, "samples_per_s": 5.0})
    out = rec.recommend([run], device="cpu", limits=limits, estimate_at=cpu_estimates).to_json()
    (ddp,) = out["strategies"]
    assert (ddp["status"], ddp["batch_size"], ddp["peak_source"], ddp["search"]) == ("predicted", 4, "predicted", None)
    assert ddp["peak_bytes"] <= limits.limit_bytes
    assert ddp["offload"]["needed"] == "none" and not ddp["offload"]["supported"]  # cpu: offload does not apply
    assert out["fastest"]["strategy"] == "ddp" and "profile runs" in out["fastest"]["basis"]
    assert out["find_batch_size"] is False


def test_trials_confirm_and_a_missing_rank_is_a_failure(cpu_estimates):
    estimate = cpu_estimates("ddp", batch_size=1)
    limit = cpu_estimates("ddp", batch_size=5).peak_bytes
    limits = rec.Limits(capacity_bytes=limit, headroom_pct=0.0, capacity_source="test")
    run = _run("ddp", 1, "ok", estimate, {"peak_allocated_bytes": estimate.peak_bytes, "samples_per_s": 5.0})
    tried = []

    def run_trial(strategy, batch):
        tried.append(batch)
        if batch == 5:  # the prediction, but a rank vanished: rejected, the search goes lower
            return judge(batch, "failed", None, limits.limit_bytes, error="rank 1 wrote no result")
        peak = cpu_estimates(strategy, batch_size=batch).peak_bytes
        return judge(batch, "ok", peak, limits.limit_bytes, samples_per_s=10.0 * batch)

    out = rec.recommend([run], device="cpu", limits=limits, estimate_at=cpu_estimates, run_trial=run_trial,
                        max_trials=4).to_json()
    (ddp,) = out["strategies"]
    assert tried == [5, 3, 4]
    assert (ddp["status"], ddp["batch_size"], ddp["search"]["num_trials"], ddp["search"]["converged"]) == (
        "confirmed", 4, 3, True)
    assert ddp["samples_per_s"] == 40.0 and out["fastest"]["samples_per_s"] == 40.0
    assert [t["status"] for t in ddp["search"]["trials"]] == ["failed", "ok", "ok"]


def test_offload_is_recommended_only_when_needed():
    from tests.conftest import FIXTURES

    # a model whose optimizer state shows beside DeepSpeed's 1 GB of bf16 bucket buffers
    estimate_at = _estimate_at(str(FIXTURES.parent.parent / "benchmarks" / "models" / "gpt.py"), "cuda", strategies=("zero3",))
    without = estimate_at("zero3", batch_size=1, offload="none").peak_bytes
    with_optimizer = estimate_at("zero3", batch_size=1, offload="optimizer").peak_bytes
    assert with_optimizer < without
    limits = rec.Limits(capacity_bytes=(without + with_optimizer) // 2, headroom_pct=0.0, capacity_source="test")
    advice = rec.offload_advice("zero3", estimate_at=estimate_at, ratio=1.0, limits=limits, device="cuda",
                                configured="none").to_json()
    assert advice["needed"] == "optimizer" and advice["supported"]
    assert [level["offload"] for level in advice["levels"]] == ["none", "optimizer"]
    roomy = rec.Limits(capacity_bytes=without, headroom_pct=0.0, capacity_source="test")
    assert rec.offload_advice("zero3", estimate_at=estimate_at, ratio=1.0, limits=roomy, device="cuda",
                              configured="optimizer").to_json()["needed"] == "none"
    tight = rec.Limits(capacity_bytes=with_optimizer // 2, headroom_pct=0.0, capacity_source="test")
    assert rec.offload_advice("zero3", estimate_at=estimate_at, ratio=1.0, limits=tight, device="cuda",
                              configured="none").to_json()["needed"] is None
    # A skipped zero3 run (DeepSpeed) still gets the advice, from its estimate.
    run = _run("zero3", 1, "skipped", estimate_at("zero3", batch_size=1))
    out = rec.recommend([run], device="cuda", limits=limits, estimate_at=estimate_at).to_json()
    (zero3,) = out["strategies"]
    assert zero3["status"] == "does_not_fit" and zero3["offload"]["needed"] == "optimizer"
    assert zero3["notes"] == ["not run: estimate only"] and out["fastest"] is None


def test_find_batch_size_end_to_end_on_cpu_ranks(tiny_gpt, tmp_path, cpu_estimates):
    # A capacity whose 10%-headroom limit falls between the peaks of batch 3 and batch 4.
    peak3 = cpu_estimates("ddp", batch_size=3).peak_bytes
    peak4 = cpu_estimates("ddp", batch_size=4).peak_bytes
    capacity = int((peak3 + peak4) / 2 / 0.9)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "profile", tiny_gpt, "--device", "cpu", "--gpus", "2", "--strategy", "ddp", "--steps", "1",
        "--find-batch-size", "--gpu-memory", f"{capacity}B", "--out", str(out),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    section = json.loads((out / "profile.json").read_text())["recommendations"]
    assert section["capacity_bytes"] == capacity and section["limit_bytes"] == int(capacity * 0.9)
    (ddp,) = section["strategies"]
    trials = ddp["search"]["trials"]
    assert ddp["status"] == "confirmed" and ddp["batch_size"] == 3, ddp
    assert ddp["peak_bytes"] <= section["limit_bytes"]
    assert [(t["batch_size"], t["status"]) for t in trials] == [(3, "ok"), (4, "over_limit")]
    assert ddp["search"]["num_trials"] == 2 and ddp["search"]["converged"]
    assert all((out / "1-ddp" / f"trial-b{t['batch_size']}" / "rank1.json").exists() for t in trials)
    assert "ddp: micro-batch 3 fits with 10% headroom" in result.output
    assert "confirmed in 2 trials" in result.output
    assert "planning capacity only" in result.output
