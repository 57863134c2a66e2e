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
from dpplan.profiler.profile_results import Measured, RunResult, measured_summary
from dpplan.reports.recommendation_text import fastest_line, offload_line, recommendation_line
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


def _measured_run(strategy, estimate, step_times, batch_size=1):
    """A finished run whose one rank timed ``step_times``, summarized as profile_results does."""
    rank = {"rank": 0, "status": "ok", "peak_allocated_bytes": estimate.peak_bytes, "step_times_s": list(step_times),
            "step_time_s": sorted(step_times)[len(step_times) // 2], "samples_per_step": batch_size}
    measured = measured_summary([rank], num_replicas=2)
    return RunResult(settings=run_settings(strategy=strategy, batch_size=batch_size, device="cpu"), status="ok",
                     estimate=estimate, measured=measured)


def _fastest(cpu_estimates, runs):
    limits = rec.Limits(capacity_bytes=64 << 30, headroom_pct=10.0, capacity_source="test")
    return rec.recommend(runs, device="cpu", limits=limits, estimate_at=cpu_estimates).fastest


def test_strategies_within_the_measured_step_time_spread_tie(cpu_estimates):
    ddp, fsdp2 = cpu_estimates("ddp", batch_size=1), cpu_estimates("fsdp2", batch_size=1)
    # medians 0.40 s and 0.41 s, each run's steps spread over 0.04 s: a difference of 0.01 s is noise
    runs = [_measured_run("fsdp2", fsdp2, [0.38, 0.41, 0.42]), _measured_run("ddp", ddp, [0.37, 0.40, 0.41])]
    fastest = _fastest(cpu_estimates, runs)
    assert (fastest.strategy, fastest.tied_with) == ("ddp", ("fsdp2",))
    # the larger of the two spreads, 0.04 s per step (both runs at batch 1: per-sample times compare as step times)
    assert fastest.step_time_s == 0.40 and fastest.step_time_spread_s == pytest.approx(0.04)
    assert fastest_line(fastest) == (
        "ddp and fsdp2 tie at 400.0 ms ± 40.0 ms per step (ddp: 5.00 samples/s at batch 1; the difference is within "
        "the measured step-time spread; measured in the profile runs, all at the profiled micro-batch)")


def test_a_strategy_faster_than_the_spread_is_the_fastest(cpu_estimates):
    ddp, fsdp2 = cpu_estimates("ddp", batch_size=1), cpu_estimates("fsdp2", batch_size=1)
    # 0.21 s apart, spreads of 0.03 s: ddp is the fastest
    runs = [_measured_run("fsdp2", fsdp2, [0.60, 0.61, 0.63]), _measured_run("ddp", ddp, [0.38, 0.40, 0.41])]
    fastest = _fastest(cpu_estimates, runs)
    assert (fastest.strategy, fastest.tied_with) == ("ddp", ())
    assert fastest_line(fastest).startswith("ddp: fastest that fits (5.00 samples/s at batch 1; measured in the profile")
    assert "more than the measured step-time spread (30.0 ms) ahead of the next" in fastest_line(fastest)
    # One timed step measures no spread: the fastest is named, and the line says a tie cannot be told.
    one_step = [_measured_run("fsdp2", fsdp2, [0.41]), _measured_run("ddp", ddp, [0.40])]
    fastest = _fastest(cpu_estimates, one_step)
    assert fastest.strategy == "ddp" and fastest.tied_with == () and fastest.step_time_spread_s is None
    assert "no step-time spread measured (one timed step), a tie cannot be told" in fastest_line(fastest)


def test_a_strategy_that_was_not_run_never_reads_as_measured(cpu_estimates):
    ddp = cpu_estimates("ddp", batch_size=1)
    run = _run("ddp", 1, "skipped", ddp)
    limits = rec.Limits(capacity_bytes=64 << 30, headroom_pct=10.0, capacity_source="test")
    section = rec.recommend([run], device="cpu", limits=limits, estimate_at=cpu_estimates)
    (ddp_rec,) = section.strategies
    assert ddp_rec.status == "predicted" and section.fastest is None
    line = recommendation_line(ddp_rec, section)
    assert line.startswith("ddp (not run: estimate only): micro-batch ") and "should fit" in line
    assert offload_line(ddp_rec, section) == "ddp (not run: estimate only): no offload needed"
