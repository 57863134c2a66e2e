"""FSDP2 under a pipeline (planner/strategies/fsdp2_pipeline.py): each pipeline rank's trace
marks where the schedule reduces its gradients, and the fsdp2 plan of each rank keeps its
groups unsharded all step, accumulates the micro-batches' gradients unreduced and
reduce-scatters them there. Accuracy against real gloo runs: tests/profiler/test_pipeline_run.py."""

import pytest

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.estimate import estimate
from dpplan.planner.strategies import fsdp2
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.trace import PARAM_CAST, TraceSettings, trace_step
from dpplan.training.model_file import load_model_file

MICRO_BATCHES, SEQ = 2, 16


def _trace(rank: int, precision: str = "bf16-mixed", schedule: str = "1f1b"):
    settings = TraceSettings(precision=precision, optimizer="sgd", pp=2, pp_schedule=schedule, pp_rank=rank,
                             grad_accum=MICRO_BATCHES, seq_len=SEQ, device_type="cpu", kernel_batch_size=1,
                             family=PARAM_CAST)
    return trace_step(load_model_file(None), settings, batch_size=1)


@pytest.fixture(scope="module")
def last_rank():
    return _trace(1)


def test_the_schedules_gradient_reduction_is_marked_after_the_last_backward(last_rank):
    kinds = [m.kind for m in last_rank.markers if m.kind != "grad"]
    assert kinds.count("reduce_grad") == 1
    reduce_at = kinds.index("reduce_grad")
    assert kinds.count("backward") == MICRO_BATCHES
    assert max(i for i, k in enumerate(kinds) if k == "backward") < reduce_at < kinds.index("optimizer")


def test_the_stages_boundaries_are_in_the_compute_dtype_under_fsdp2_mixed_precision(last_rank):
    """The receive buffer of the hidden states, held from the warm-up step, is bf16 (FSDP2's
    MixedPrecisionPolicy computes in bf16, as the real run's static metadata says): micro-batch
    1 x SEQ x 512 hidden x 2 bytes, not fp32's twice that."""
    from dpplan.planner.trace import ACTIVATION

    baseline = last_rank.event_storage[:last_rank.num_baseline_events]
    held = {int(last_rank.storage_bytes[s]) for s in baseline if last_rank.storage_category[s] == ACTIVATION}
    assert SEQ * 512 * 2 in held and SEQ * 512 * 4 not in held


def _peak(trace, gpus: int, precision: str = "bf16-mixed") -> int:
    layout = Layout.of("fsdp2", gpus, pp=2, precision=precision, grad_accum=MICRO_BATCHES, device_type="cpu")
    return fsdp2.plan_rank(trace, layout).timeline.peak(1).peak_bytes


def test_sharding_over_more_data_parallel_ranks_saves_on_every_pipeline_rank(last_rank):
    # dp 2 -> 4: the sharded fp32 parameters, gradients and optimizer state halve; the
    # unsharded parameters and the accumulated gradients of the step do not
    assert _peak(last_rank, 8) < _peak(last_rank, 4)


def test_fsdp2_and_tensor_parallelism_are_planned_under_a_pipeline():
    run = RunSpec(pp=2, tp=2, grad_accum=MICRO_BATCHES, seq_len=SEQ, optimizer="sgd")
    plan = estimate(PlanConfig(run=run, strategies=("fsdp2",), gpus=(8,), device="cpu"), processes=1)
    (e,) = plan.estimates
    assert (e.pp, e.tp, e.dp) == (2, 2, 2)
    assert [s.pp_rank for s in e.stages] == [0, 1]
    assert e.peak_bytes == max(s.peak_bytes for s in e.stages)
