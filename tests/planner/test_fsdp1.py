"""FSDP1 strategies: the flat-parameter layout against torch's own, and the replay's invariants.
(Real CPU runs against the estimate: benchmarks/accuracy.py.)"""

import functools

import pytest
import torch
import torch.distributed as dist

from dpplan.planner.strategies import Layout, fsdp1
from dpplan.planner.trace import OPTIMIZER_STATE, PARAM_CAST, TraceSettings, trace_step
from dpplan.training.model_file import build_module, load_model_file
from dpplan.training.units import find_units


def trace_for(path, precision="fp32", device_type="cpu", grad_accum=1):
    family = PARAM_CAST if precision in ("bf16-mixed", "fp16-mixed") else "autocast"
    settings = TraceSettings(
        precision=precision, family=family, cast_buffers=family == PARAM_CAST,
        num_micro_batches=2 if grad_accum > 1 else 1, grad_accum=grad_accum, device_type=device_type,
    )
    return trace_step(load_model_file(path), settings)


def layout(strategy="fsdp-full", world=2, **kwargs):
    return Layout.of(strategy, world, device_type=kwargs.pop("device_type", "cpu"), **kwargs)


def test_flat_param_layout_matches_fsdp1(tiny_gpt):
    """Padding, alignment and each rank's slice of every parameter, as FlatParamHandle builds
    them for 3 ranks under bf16 mixed precision (a fake process group: no collectives)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists")
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from torch.testing._internal.distributed.fake_pg import FakeStore

    trace = trace_for(tiny_gpt, "bf16-mixed")
    world = 3
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            model = build_module(load_model_file(tiny_gpt))
            ids = {id(u) for u in find_units(model)}
            wrapped = FullyShardedDataParallel(
                model, auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in ids),  # noqa: B023 (wrapped in this iteration)
                use_orig_params=True, device_id=torch.device("cpu"),
                mixed_precision=MixedPrecision(param_dtype=torch.bfloat16),
            )
            real = sorted(
                (m._handle.flat_param for m in FullyShardedDataParallel.fsdp_modules(wrapped)),
                key=lambda p: p._fqns[0],
            )
        finally:
            dist.destroy_process_group()
        planned = [f for f in fsdp1.flat_params(trace, layout(world=world)) if f is not None]
        planned.sort(key=lambda f: trace.params[f.params[0]].name)
        assert len(planned) == len(real)
        for flat, param in zip(planned, real):
            assert flat.numel == param._unpadded_unsharded_size.numel()
            assert flat.shard_numel == param._sharded_size.numel()
            expected = [info.numel_in_shard or 0 for info in param._shard_param_infos]
            assert flat.local_numels(trace, rank) == expected


def test_step_ends_where_it_started(tiny_gpt):
    """Steady state: the sharded gradients inserted before the step are the ones the step
    leaves behind, for every strategy, with and without gradient accumulation."""
    for grad_accum in (1, 2):
        trace = trace_for(tiny_gpt, "bf16-mixed", grad_accum=grad_accum)
        for strategy in ("fsdp-full", "fsdp-grad-op", "fsdp-no-shard"):
            timeline = fsdp1.plan_rank(trace, layout(strategy, grad_accum=grad_accum)).timeline
            levels = timeline.levels(3)
            at_start = levels[trace.num_baseline_events + timeline._ins_position.count(0) - 1]
            assert levels[-1] == pytest.approx(at_start)


def test_nccl_has_no_gloo_temporaries(tiny_gpt):
    """The root's all-gather before the first op: gloo stages the output in a buffer as large
    as the unsharded flat parameter, NCCL gathers in place."""
    trace = trace_for(tiny_gpt)

    def before_first_op(timeline):
        levels = timeline.levels(2)
        _, _, is_trace, index = timeline._merged()
        step_start = trace.num_baseline_events + timeline._ins_position.count(0)
        first_op = next(j for j in range(len(levels)) if is_trace[j] and index[j] >= trace.num_baseline_events)
        return levels[step_start:first_op].max()

    cpu = fsdp1.plan_rank(trace, layout()).timeline
    cuda = fsdp1.plan_rank(trace, layout(device_type="cuda")).timeline
    root = [f for f in fsdp1.flat_params(trace, layout()) if f is not None][-1]
    assert before_first_op(cpu) - before_first_op(cuda) == pytest.approx(root.numel * root.compute_itemsize)


def test_offload_moves_optimizer_state_to_the_host(tiny_gpt):
    trace = trace_for(tiny_gpt, device_type="cuda")
    plan = fsdp1.plan_rank(trace, layout(device_type="cuda", offload="optimizer+params"))
    timeline = plan.timeline
    state = trace.storage_category == OPTIMIZER_STATE
    assert not timeline.storage_scale[state].any()
    assert plan.host_bytes > 3 * 4 * sum(p.numel for p in trace.params) // 2
    plain = fsdp1.plan_rank(trace, layout(device_type="cuda")).timeline
    assert timeline.peak(4).peak_bytes < plain.peak(4).peak_bytes


def test_candidate_ranks_hold_the_maximum(tiny_gpt):
    trace = trace_for(tiny_gpt)
    world = 24
    peaks = [fsdp1.plan_rank(trace, layout(world=world, rank=r)).timeline.peak(2).peak_bytes for r in range(world)]
    candidates = fsdp1.ranks_to_evaluate(trace, layout(world=world))
    assert len(candidates) <= 5
    assert max(peaks[r] for r in candidates) == max(peaks)
