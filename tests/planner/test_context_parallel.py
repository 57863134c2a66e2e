"""Context parallelism planned by rule (planner/context_parallel.py): a cp rank's step is the
step at seq_len / cp tokens plus, at every attention op, ring attention's buffers; parameters
shard over dp x cp. Not validated against a real run (no CPU kernel): these tests pin the rule."""

from collections import Counter

import pytest

from dpplan.config import PlanConfig, RunSpec
from dpplan.errors import UsageError
from dpplan.planner.estimate import estimate
from dpplan.planner.trace import TRACE_BATCH_SIZE, TraceSettings, trace_step
from dpplan.planner.trace.index import trace_index
from dpplan.training.model_file import load_model_file

LAYERS, HEADS, HEAD_DIM, LOCAL_SEQ = 6, 8, 64, 32  # the bundled GPT, 64 tokens over 2 ranks
QKV = TRACE_BATCH_SIZE * HEADS * LOCAL_SEQ * HEAD_DIM * 4  # one of q, k, v (fp32)
LSE = TRACE_BATCH_SIZE * HEADS * LOCAL_SEQ * 4


def _sizes(trace) -> Counter:
    return Counter(int(b) for b in trace.storage_bytes if b)


def test_a_cp_rank_is_the_local_step_plus_ring_buffers_at_each_attention_op():
    spec = load_model_file(None)
    local = trace_step(spec, TraceSettings(precision="fp32", seq_len=LOCAL_SEQ, device_type="cuda"))
    ring = trace_step(spec, TraceSettings(precision="fp32", seq_len=LOCAL_SEQ, cp=2, device_type="cuda"))
    assert not _sizes(local) - _sizes(ring)  # everything of the local step is there
    # forward: k, v made contiguous (the GPT's are transposed views), their concatenation, the
    # group's gathered k/v (2 ranks), the fp32 output and logsumexp, one ring step's output and
    # logsumexp; backward: fp32 q/k/v gradient accumulators, k/v contiguous, concatenated,
    # gathered, the fp32 k/v gradients' concatenation and all-to-all buffer, one step's gradients
    forward = [2 * QKV, 2 * QKV, 4 * QKV, QKV, LSE, QKV, LSE]
    backward = [3 * QKV, 2 * QKV, 2 * QKV, 4 * QKV, 2 * QKV, 2 * QKV, 3 * QKV]
    assert _sizes(ring) - _sizes(local) == Counter((forward + backward) * LAYERS)
    assert any("context parallelism: planned by rule, not validated" in note for note in ring.notes)
    # none of them outlives its op: the same storages are alive when backward starts
    start = trace_index(ring).backward_starts[0]
    assert ring.live_bytes(TRACE_BATCH_SIZE)[start] == local.live_bytes(TRACE_BATCH_SIZE)[
        trace_index(local).backward_starts[0]]


def test_parameters_shard_over_dp_times_cp_and_activations_divide():
    run = RunSpec(precision="fp32", seq_len=128, cp=2)
    plan = estimate(PlanConfig(run=run, strategies=("fsdp2",), gpus=(8,), device="cuda"), processes=1)
    whole = estimate(PlanConfig(run=RunSpec(precision="fp32", seq_len=128), strategies=("fsdp2",), gpus=(8,),
                                device="cuda"), processes=1)
    (cp,), (dp,) = plan.estimates, whole.estimates
    assert (cp.dp, cp.cp, cp.layout) == (4, 2, "dp4 x cp2")
    assert cp.breakdown["optimizer"] == dp.breakdown["optimizer"]  # sharded over all 8 ranks either way
    assert cp.breakdown["activations"] < dp.breakdown["activations"]


def test_refusals_are_one_line():
    with pytest.raises(UsageError, match="needs --seq-len divisible by 2 x cp = 4"):
        RunSpec(cp=2, seq_len=66)
    with pytest.raises(UsageError, match="--cp runs beside fsdp2"):
        RunSpec(cp=2, seq_len=64).check_strategies(("ddp",))
    with pytest.raises(UsageError, match="GPUs only"):
        PlanConfig(run=RunSpec(cp=2, seq_len=64), strategies=("fsdp2",), gpus=(2,), device="cpu")
    with pytest.raises(UsageError, match="--cp with --pp"):
        RunSpec(cp=2, pp=2, grad_accum=2, seq_len=64)
