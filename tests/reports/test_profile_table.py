from rich.console import Console

from dpplan.profiler.batch_search import Trial
from dpplan.profiler.profile_document import DeviceInfo
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


def test_header_names_tensor_parallelism():
    config = {"batch_size": 4, "grad_accum": 1, "precision": "fp32", "optimizer": "adamw", "warmup_steps": 1, "steps": 2}
    for extra, expected in (({}, None), ({"tp": 2, "sequence_parallel": True}, "tensor parallel 2 + sequence parallel")):
        console = Console(width=300, record=True)
        render_profile(profile_document(config={**config, **extra}, runs=()), console)
        header = console.export_text().splitlines()[0]
        assert (expected in header) if expected else ("tensor parallel" not in header)
