"""ZeRO stages and DataParallel: what each shards, offloads and keeps, on the tiny GPT.

The stages are checked against real DeepSpeed runs in tests/profiler/test_cpu_accuracy.py
(where DeepSpeed is installed); these tests pin the mechanisms the model is built from
(DeepSpeed's runtime/zero/stage_1_and_2.py, stage3.py), with or without DeepSpeed.
"""

import pytest

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.estimate import estimate


def plan(tiny_gpt, strategies, gpus, **options):
    config = PlanConfig(run=RunSpec(model=tiny_gpt, precision="fp32", **options), strategies=strategies, gpus=gpus)
    return {(e.strategy, e.gpus): e for e in estimate(config).estimates}


def test_optimizer_state_is_partitioned_by_every_stage(tiny_gpt):
    estimates = plan(tiny_gpt, ("ddp", "zero1", "zero2", "zero3"), (2, 8))
    full = estimates[("ddp", 2)].breakdown["optimizer"]
    for stage in ("zero1", "zero2", "zero3"):
        two, eight = estimates[(stage, 2)].breakdown["optimizer"], estimates[(stage, 8)].breakdown["optimizer"]
        assert two == pytest.approx(full / 2, rel=0.01)
        assert eight == pytest.approx(full / 8, rel=0.02)


def test_only_zero3_partitions_parameters(tiny_gpt):
    estimates = plan(tiny_gpt, ("zero1", "zero2", "zero3"), (2, 8))
    assert estimates[("zero1", 2)].breakdown["params"] == estimates[("zero1", 8)].breakdown["params"]
    assert estimates[("zero2", 2)].breakdown["params"] == estimates[("zero2", 8)].breakdown["params"]
    assert estimates[("zero3", 8)].breakdown["params"] < estimates[("zero3", 2)].breakdown["params"]


def test_optimizer_offload_moves_state_to_the_host(tiny_gpt):
    on_gpu = plan(tiny_gpt, ("zero2", "zero3"), (4,))
    offloaded = plan(tiny_gpt, ("zero2", "zero3"), (4,), offload="optimizer")
    for stage in ("zero2", "zero3"):
        assert on_gpu[(stage, 4)].host_bytes is None
        assert offloaded[(stage, 4)].breakdown["optimizer"] == 0
        # Per node: 4 ranks' partitions of the fp32 master weights and both Adam moments at least.
        assert offloaded[(stage, 4)].host_bytes >= 3 * on_gpu[(stage, 4)].breakdown["optimizer"] * 4 // 2


def test_param_offload_is_zero3_only(tiny_gpt):
    zero3 = plan(tiny_gpt, ("zero3",), (4,), offload="optimizer")[("zero3", 4)]
    zero3_params = plan(tiny_gpt, ("zero3",), (4,), offload="optimizer+params")[("zero3", 4)]
    assert zero3_params.host_bytes > zero3.host_bytes
    zero2 = plan(tiny_gpt, ("zero2",), (4,), offload="optimizer+params")[("zero2", 4)]
    assert any("offload_param is a zero3 option" in n for n in zero2.notes)


def test_data_parallel_device_zero_holds_the_whole_batch(tiny_gpt):
    """nn.DataParallel scatters one batch from device 0 and gathers outputs and gradients
    back there: its peak grows with the GPU count at the same per-GPU micro-batch."""
    estimates = plan(tiny_gpt, ("dp", "single"), (1, 2, 8), batch_size=4)
    assert estimates[("dp", 8)].peak_allocated_bytes > estimates[("dp", 2)].peak_allocated_bytes
    assert estimates[("dp", 2)].peak_allocated_bytes > estimates[("single", 1)].peak_allocated_bytes


def test_bf16_mixed_plans_deepspeeds_bf16_section(tiny_gpt):
    """What Trainer, accelerate and Lightning configure from "bf16": the engine casts the
    parameters (not the buffers) to bf16, gradients are bf16, the master partition is fp32."""
    from dpplan.planner.estimate import trace_settings_for
    from dpplan.planner.trace import AUTOCAST, ENGINE_CAST

    fp32 = plan(tiny_gpt, ("zero2",), (2,))[("zero2", 2)]
    config = PlanConfig(run=RunSpec(model=tiny_gpt, precision="bf16-mixed"), strategies=("zero2", "ddp-zero1"), gpus=(2,))
    # token ids in: the cast is FSDP2's (one trace for both); floating inputs: cast before the step
    assert trace_settings_for("zero2", config, floating_inputs=False) == trace_settings_for("fsdp2", config)
    assert trace_settings_for("zero2", config, floating_inputs=True).family == ENGINE_CAST
    assert trace_settings_for("ddp-zero1", config).family == AUTOCAST  # torch's ZeRO computes under autocast
    bf16 = {e.strategy: e for e in estimate(config).estimates}["zero2"]
    assert bf16.breakdown["params"] == pytest.approx(fp32.breakdown["params"] / 2, rel=0.01)
    assert any('DeepSpeed "bf16"' in note and "buffers kept in fp32" in note for note in bf16.notes)
