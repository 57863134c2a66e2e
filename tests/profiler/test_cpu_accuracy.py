"""CI's guard on accuracy: a few real CPU runs (gloo, torchrun) against `--device cpu` estimates.

The full table is benchmarks/accuracy.py (docs/accuracy.md); these are the cheap cases, one per
strategy family, on the tiny GPT fixture (DeepSpeed's stages where DeepSpeed is installed), FSDP
mixed precision on a CNN whose float input is large next to it (FSDP casts the root's inputs while
the fp32 batch stays alive), and the hard third-party cases: a grouped-matmul MoE, a MoE routed
through nonzero(), a data-dependent audio model and a bf16 CNN (.ci/run runs them once natively
and once forced to AVX2). Both sides are exact byte counts, so the bound is the benchmark's
median target, not its worst-case one.
"""

import pytest

from dpplan.config import PlanConfig, RunConfig, RunSpec
from dpplan.planner.estimate import estimate
from dpplan.planner.strategies.registry import DEEPSPEED_STAGES
from dpplan.profiler.cpu_run import run_cpu
from tests.conftest import FIXTURES

TOLERANCE_PCT = 0.5

CASES = [
    # model fixture, strategy, ranks, precision, extra settings
    ("tiny_gpt", "single", 1, "fp32", {}),
    ("tiny_gpt", "ddp", 2, "bf16-mixed", {}),
    ("tiny_gpt", "ddp", 2, "fp32", {"grad_accum": 2}),
    ("tiny_gpt", "ddp-zero1", 2, "fp32", {}),
    ("tiny_gpt", "fsdp-full", 2, "fp32", {"activation_checkpointing": True}),
    ("tiny_gpt", "fsdp-no-shard", 2, "bf16-mixed", {}),
    ("tiny_gpt", "fsdp2", 2, "bf16-mixed", {}),
    ("tiny_cnn", "fsdp2", 2, "bf16-mixed", {}),
    ("tiny_cnn", "fsdp-full", 2, "bf16-mixed", {}),
    # DeepSpeed (deepspeed.initialize on gloo): stage 1 fp32, the "bf16" section at stages 2 and 3
    ("tiny_gpt", "zero1", 2, "fp32", {}),
    ("tiny_gpt", "zero2", 2, "bf16-mixed", {"grad_accum": 2}),
    ("tiny_gpt", "zero3", 2, "bf16-mixed", {"activation_checkpointing": True}),
    # third-party architectures (benchmarks/models/hf, built with transformers): the hard cases
    ("hf/qwen3_moe", "single", 1, "fp32", {}),  # MoE experts through torch._grouped_mm
    ("hf/switch", "single", 1, "fp32", {}),  # MoE loop over nonzero() of a one-hot routing mask
    ("hf/wav2vec2", "single", 1, "fp32", {}),  # data-dependent: time masking, CTC targets
    ("hf/convnext", "ddp", 2, "bf16-mixed", {}),  # bf16 CNN: channels-last depthwise convolutions
]
THIRD_PARTY = FIXTURES.parent.parent / "benchmarks" / "models"
DEEPSPEED_CONFIGS = FIXTURES.parent.parent / "benchmarks" / "deepspeed_configs"


@pytest.mark.parametrize(("model", "strategy", "ranks", "precision", "extra"), CASES, ids=lambda v: str(v))
def test_estimate_matches_a_real_cpu_run(model, strategy, ranks, precision, extra):
    if strategy in DEEPSPEED_STAGES:
        pytest.importorskip("deepspeed", reason="zero1/2/3 run through DeepSpeed (.ci/run installs it)")
    if model.startswith("hf/"):
        pytest.importorskip("transformers", reason="the third-party zoo is built with transformers")
        path = str(THIRD_PARTY / f"{model}.py")
    else:
        path = str(FIXTURES / f"{model}.py")
    settings = dict(batch_size=2, precision=precision, optimizer="adamw", **extra)
    plan = estimate(PlanConfig(run=RunSpec(model=path, **settings), strategies=(strategy,), gpus=(ranks,), device="cpu"))
    estimated = plan.estimates[0].peak_bytes

    runs = run_cpu(RunConfig(run=RunSpec(model=path, **settings), strategy=strategy, steps=3), ranks)
    measured = max(r["steady_peak_bytes"] for r in runs)

    error_pct = 100 * (estimated - measured) / measured
    assert abs(error_pct) <= TOLERANCE_PCT, f"estimate {estimated} vs measured {measured} ({error_pct:+.3f}%)"


def test_a_run_past_its_timeout_leaves_no_process_behind(tiny_gpt, tmp_path):
    """A run far longer than its timeout: the launcher and its ranks (whose command lines name
    the output folder) are all gone when run_cpu returns."""
    import threading

    import psutil

    from dpplan.profiler.cpu_run import RunFailed

    outcome = []

    def run():
        try:
            run_cpu(RunConfig(run=RunSpec(model=tiny_gpt), strategy="ddp", steps=1_000_000), 2, timeout_s=15, out_dir=tmp_path)
        except RunFailed as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    for process in left:
        process.kill()
    assert not thread.is_alive(), "run_cpu did not return: a rank kept its output pipes open"
    assert outcome and "did not finish" in str(outcome[0])
    assert not left


DEEPSPEED_CONFIG_CASES = [
    # model, config in benchmarks/deepspeed_configs: what the file changes is planned
    ("hf/gpt2", "torch_autocast_zero2.json"),  # torch_autocast, the tied embedding/head reduced in bf16
    ("gpt", "zero1_small_buckets.json"),  # buckets that fill during the reduction, oversized gradients
    ("llama", "zero3_small_groups.json"),  # optimizer sub-groups, small buckets, prefetch, persistence
]


@pytest.mark.parametrize(("model", "config_file"), DEEPSPEED_CONFIG_CASES, ids=lambda v: str(v))
def test_deepspeed_config_file_matches_a_real_cpu_run(model, config_file):
    pytest.importorskip("deepspeed", reason="zero1/2/3 run through DeepSpeed (.ci/run installs it)")
    if model.startswith("hf/"):
        pytest.importorskip("transformers", reason="the third-party zoo is built with transformers")
    from dpplan.planner.deepspeed_config import merge_with_flags, read_deepspeed_config

    path = str(THIRD_PARTY / f"{model}.py")
    flags = {"strategies": ("ddp",), "precision": "bf16-mixed", "offload": "none", "optimizer": "adamw",
             "batch_size": 2, "grad_accum": 1}
    settings = merge_with_flags(read_deepspeed_config(str(DEEPSPEED_CONFIGS / config_file)), flags, set(), (2,))
    strategies = settings.pop("strategies")
    plan = estimate(PlanConfig(run=RunSpec(model=path, **settings), strategies=strategies, gpus=(2,), device="cpu"))
    estimated = plan.estimates[0].peak_bytes
    run = RunConfig(run=RunSpec(model=path, batch_size=2, precision=settings["precision"], zero=settings["zero"]),
                    strategy=strategies[0], steps=3)
    measured = max(r["steady_peak_bytes"] for r in run_cpu(run, 2))
    error_pct = 100 * (estimated - measured) / measured
    assert abs(error_pct) <= TOLERANCE_PCT, f"estimate {estimated} vs measured {measured} ({error_pct:+.3f}%)"
