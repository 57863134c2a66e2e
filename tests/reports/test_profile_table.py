import re

import pytest
from rich.console import Console

from dpplan.profiler.batch_search import Trial
from dpplan.profiler.profile_document import DeviceInfo, ProfileDocument
from dpplan.profiler.profile_results import Comparison, Measured, RunResult
from dpplan.profiler.recommendation_results import (
    BatchSearch,
    Fastest,
    OffloadAdvice,
    OffloadLevel,
    Profiled,
    Recommendation,
    Recommendations,
)
from dpplan.reports.profile_table import render_profile
from dpplan.reports.recommendation_text import format_pct, format_rate
from dpplan.reports.units import format_bytes
from tests.records import profile_document, run_settings, strategy_estimate

MiB = 1 << 20


def test_cuda_table_names_the_three_numbers_and_the_gaps():
    measured = {
        "peak_allocated_bytes": 100 * MiB, "peak_reserved_bytes": 120 * MiB, "peak_nvml_bytes": 700 * MiB,
        "allocator_cache_bytes": 20 * MiB, "non_pytorch_bytes": 580 * MiB, "step_time_s": 0.25,
        "samples_per_s": 32.0, "tokens_per_s": 16384.0, "per_rank": [],
    }
    estimate = strategy_estimate(peak_allocated_bytes=101 * MiB, peak_reserved_bytes=121 * MiB, peak_bytes=650 * MiB)
    document = profile_document(
        device=DeviceInfo(type="cuda", gpus=2, gpu="h100-80gb", description="2 x NVIDIA H100 80GB HBM3 (1 node, nccl)"),
        runs=(
            RunResult(settings=run_settings(strategy="ddp"), status="ok", measured=Measured(**measured),
                      estimate=estimate, comparison=Comparison(device="cuda", allocated_pct=1.0)),
            RunResult(settings=run_settings(strategy="fsdp2"), status="oom",
                      error="batch 4 does not fit with fsdp2 on 2 GPUs (rank 0: ...)",
                      measured=Measured(summarized=False), estimate=estimate, notes=("a note",)),
        ),
    )
    console = Console(width=200, record=True)
    render_profile(document, console)
    text = console.export_text()
    assert "100.00 MiB / 101.00 MiB" in text and "700.00 MiB / 650.00 MiB" in text
    assert "+1.00%" in text and "250.0" in text and "16.38K" in text
    assert "allocator cache (reserved - allocated) up to 20.00 MiB" in text
    assert "NCCL and other (NVML used - reserved) up to 580.00 MiB" in text
    assert "fsdp2: batch 4 does not fit" in text and "note: a note" in text


def test_recommendations_come_first_with_their_reasons():
    GiB = 1 << 30
    limit = 72 * GiB
    profiled = Profiled(batch_size=4, status="ok", fit_bytes=None, samples_per_s=None)
    section = Recommendations(
        capacity_bytes=80 * GiB, capacity_source="h100-80gb memory", headroom_pct=10.0,
        limit_bytes=limit, find_batch_size=True, max_trials=4, notes=("a note",),
        strategies=(
            Recommendation(
                strategy="ddp", status="confirmed", batch_size=12, peak_bytes=70 * GiB, predicted_batch_size=12,
                search=BatchSearch(num_trials=3, converged=True, stop_reason="batch 12 fits and 13 does not",
                                   smallest_rejected=13,
                                   trials=(Trial(batch_size=12, status="ok", peak_bytes=70 * GiB, limit_bytes=limit),
                                           Trial(batch_size=14, status="oom", peak_bytes=None, limit_bytes=limit))),
                offload=OffloadAdvice(needed="none", configured="none", supported=False,
                                      levels=(OffloadLevel(offload="none", predicted_peak_bytes=40 * GiB),)),
                profiled=profiled),
            Recommendation(
                strategy="zero3", status="does_not_fit", predicted_batch_size=0,
                offload=OffloadAdvice(needed="optimizer", configured="none", supported=True,
                                      levels=(OffloadLevel(offload="none", predicted_peak_bytes=93 * GiB),
                                              OffloadLevel(offload="optimizer", predicted_peak_bytes=61 * GiB))),
                profiled=profiled),
        ),
        fastest=Fastest(strategy="ddp", samples_per_s=412.0, batch_size=12,
                        basis="measured at each strategy's recommended micro-batch", num_candidates=1),
    )
    document = profile_document(recommendations=section)
    console = Console(width=250, record=True)
    render_profile(document, console)
    text = console.export_text()
    assert text.index("Recommendations") < text.index("strategy")  # above the table
    assert "limit 72.00 GiB" in text
    assert "ddp: micro-batch 12 fits with 10% headroom (peak 70.00 GiB of 80.00 GiB; confirmed in 3 trials)" in text
    assert "trials: b12 ok 70.00 GiB, b14 oom" in text
    assert "zero3: needs optimizer offload (batch 1 peak 93.00 GiB > limit 72.00 GiB; with offload 61.00 GiB)" in text
    assert "ddp: fastest that fits (412 samples/s at batch 12" in text
    assert "note: a note" in text


def test_header_names_tensor_and_expert_parallelism():
    config = {"batch_size": 4, "grad_accum": 1, "precision": "fp32", "optimizer": "adamw", "warmup_steps": 1, "steps": 2}
    for extra, expected in (({}, None), ({"tp": 2, "sequence_parallel": True}, "tensor parallel 2 + sequence parallel"),
                            ({"ep": 2}, "expert parallel 2")):
        console = Console(width=300, record=True)
        render_profile(profile_document(config={**config, **extra}, runs=()), console)
        header = console.export_text().splitlines()[0]
        assert (expected in header) if expected else ("parallel" not in header)


def _strategies_document(cuda: bool):
    """Every strategy (the longest names), peaks of tens of GiB, and one run skipped."""
    from dpplan.planner.strategies import STRATEGIES

    GiB = 1 << 30
    runs = []
    for index, strategy in enumerate(STRATEGIES):
        measured = Measured(peak_allocated_bytes=(40 + index) * GiB + 12345, peak_reserved_bytes=(42 + index) * GiB,
                            peak_nvml_bytes=(43 + index) * GiB if cuda else None,
                            peak_rss_bytes=None if cuda else (50 + index) * GiB,
                            step_time_s=1.5 + index, samples_per_s=123.4, tokens_per_s=505_000.0, per_rank=())
        estimate = strategy_estimate(strategy=strategy, peak_allocated_bytes=(41 + index) * GiB,
                                     peak_reserved_bytes=(42 + index) * GiB + 7 * MiB, peak_bytes=(44 + index) * GiB)
        status = "skipped" if strategy == "dp" else "ok"
        runs.append(RunResult(settings=run_settings(strategy=strategy), status=status,
                              measured=None if status == "skipped" else measured, estimate=estimate,
                              error="estimate only" if status == "skipped" else None,
                              comparison=Comparison(device="cuda" if cuda else "cpu", allocated_pct=-2.5)))
    device = (DeviceInfo(type="cuda", gpus=8, gpu="h100-80gb", description="8 x NVIDIA H100 80GB HBM3 (1 node, nccl)")
              if cuda else DeviceInfo(type="cpu", gpus=2, gpu=None, description="2 CPU ranks (gloo)"))
    return profile_document(device=device, runs=tuple(runs))


@pytest.mark.parametrize("width", (80, 100, 120))
@pytest.mark.parametrize("source", ["every strategy, cuda", "every strategy, cpu", "profile run, as cuda"])
def test_strategies_and_peaks_are_never_cut(source, width, request):
    """Each run's strategy, status, measured and estimated peaks and error are whole at 80,
    100 and 120 columns, no line is wider, nothing is ellipsised."""
    if source == "profile run, as cuda":  # a real 2-rank run recast as a GPU one (conftest)
        document = ProfileDocument.from_json(request.getfixturevalue("gpu_profile_document"))
    else:
        document = _strategies_document(cuda=source.endswith("cuda"))
    cuda = document.device.type == "cuda"
    console = Console(width=width, record=True)
    render_profile(document, console)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in text
    for run in document.runs:
        rows = [line for line in lines if line.split()[:2] == [run.settings.strategy, run.status]]
        assert rows, run.settings.strategy
        if run.measured is None:
            continue
        measured, estimate = run.measured, run.estimate
        allocated_estimate = estimate.peak_allocated_bytes if cuda else estimate.peak_bytes
        figures = [format_bytes(measured.peak_allocated_bytes), format_bytes(allocated_estimate),
                   format_pct(run.error_pct), format_rate(measured.samples_per_s)]
        if cuda:
            figures += [format_bytes(v) for v in (measured.peak_reserved_bytes, estimate.peak_reserved_bytes,
                                                  measured.peak_nvml_bytes, estimate.peak_bytes)]
        for figure in figures:
            assert re.search(rf"(^|\s){re.escape(figure)}(\s|$)", text), (figure, text)
        row, below = rows[0].split(), lines[lines.index(rows[0]) + 1].split()
        if "meas" in row:  # the narrow table: measured above estimated, labelled
            assert below[0] == "est" and format_bytes(allocated_estimate) == " ".join(below[1:3])
        else:
            assert f"{format_bytes(measured.peak_allocated_bytes)} / {format_bytes(allocated_estimate)}" in rows[0]
