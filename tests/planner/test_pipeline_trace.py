"""One pipeline rank, traced (planner/trace/pipeline_rank.py) and planned
(planner/pipeline_estimate.py): each rank holds its own stages' parameters, the schedule's
in-flight micro-batches, and what its forward and backward allocate is what a real 2-rank gloo
run of torch's schedule allocates, to the byte, for every schedule (the zero-bubble ones split
each backward into an input step and a weight step)."""

import contextlib
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dpplan.config import PlanConfig, RunSpec
from dpplan.errors import UsageError
from dpplan.planner.estimate import estimate
from dpplan.planner.trace import TraceSettings, trace_step
from dpplan.training.model_file import example_batch_for, load_model_file
from dpplan.training.pipeline_layout import PipelineLayout
from dpplan.training.pipeline_parallel import in_flight_micro_batches
from tests.conftest import FIXTURES
from tests.gloo_ranks import run_on_gloo_ranks

MICRO, SEQ, MICRO_BATCHES = 2, 16, 4


def _settings(schedule: str, rank: int, pp: int = 2, **kw) -> TraceSettings:
    return TraceSettings(precision="fp32", optimizer="sgd", pp=pp, pp_schedule=schedule, pp_rank=rank,
                         grad_accum=MICRO_BATCHES, seq_len=SEQ, device_type="cpu", kernel_batch_size=MICRO, **kw)


def _step_growth(trace) -> int:
    """Largest live bytes of the forward and backward above the level the step starts at."""
    live = trace.live_bytes(MICRO)
    optimizer = next(m.event for m in trace.markers if m.kind == "optimizer")
    start = live[trace.num_baseline_events - 1]
    return int(live[trace.num_baseline_events - 1:optimizer].max() - start)


def test_each_rank_holds_its_stages_parameters():
    spec = load_model_file(None)
    whole = {p.name: p.numel for p in trace_step(spec, TraceSettings(precision="fp32", seq_len=SEQ)).params}
    ranks = [trace_step(spec, _settings("interleaved-1f1b", r), batch_size=MICRO) for r in range(2)]
    assert [t.pipeline_stages for t in ranks] == [(0, 2), (1, 3)]
    # 6 blocks over 4 stages: 2, 2, 1, 1; the embeddings on stage 0, the norm and head on stage 3
    assert ranks[0].pipeline_owns == ("embedding", "layers 0-1", "layer 4")
    assert ranks[1].pipeline_owns == ("layers 2-3", "layer 5", "head")
    names = [{p.name for p in t.params} for t in ranks]
    assert "stage0.tok_emb.weight" in names[0] and "stage3.head.weight" in names[1]
    assert sum(p.numel for t in ranks for p in t.params) == sum(whole.values())


def test_in_flight_micro_batches_follow_the_schedule():
    """GPipe runs every forward first; 1F1B's rank r holds pp - r (Narayanan et al. 2021,
    PipeDream-Flush)."""
    assert in_flight_micro_batches(PipelineLayout(pp=4, schedule="gpipe", num_micro_batches=8)) == [8, 8, 8, 8]
    assert in_flight_micro_batches(PipelineLayout(pp=4, schedule="1f1b", num_micro_batches=8)) == [4, 3, 2, 1]


def _measure(rank, world, init, results, schedule):
    os.environ["OMP_NUM_THREADS"] = "1"
    from dpplan.profiler.cpu_memory import CpuMemoryRecorder, enable_process_wide_accounting
    from dpplan.training import pipeline_parallel as pipe
    from dpplan.training.optimizers import build_optimizer
    from dpplan.training.training_step import run_optimizer_step

    enable_process_wide_accounting()
    recorder = CpuMemoryRecorder().start()
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    spec = load_model_file(None)
    layout = PipelineLayout(pp=world, schedule=schedule, num_micro_batches=MICRO_BATCHES)
    model = spec.build_model()
    stages = [pipe.stage_module(spec, model, i, layout.num_stages) for i in range(layout.num_stages)]
    inputs, target = pipe.pipeline_batch(example_batch_for(spec, MICRO * MICRO_BATCHES, SEQ))
    shapes = pipe.boundary_shapes(stages, inputs.tensor_split(MICRO_BATCHES)[0])
    indices = layout.stages_of(rank)
    mine = [stages[i] for i in indices]
    del stages, model
    optimizer = build_optimizer("sgd", [p for m in mine for p in m.parameters()], device_type="cpu")
    schedule_ = pipe.build_schedule(mine, indices, layout, shapes, pipe.stage_loss(spec, None), torch.device("cpu"))
    for step in range(2):
        # a step starts by dropping the previous step's input gradients (clear_runtime_states),
        # before it allocates anything; done here just before the mark, so that the level the
        # step's growth is measured from is the plan's baseline
        for stage in getattr(schedule_, "_stages", None) or [schedule_._stage]:
            stage.clear_runtime_states()
        with recorder.mark(f"step{step}"):
            pipe.run_pipeline_step(schedule_, layout, indices, inputs, target, autocast=contextlib.nullcontext())
        run_optimizer_step(optimizer, None)
    timeline = recorder.stop()
    start, end = timeline.mark_spans("step1")[0]
    results[rank] = timeline.peak_between(start, end) - timeline.level_at(start - 1)
    dist.destroy_process_group()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zero-bubble", "zbv"])
def test_the_step_allocates_what_a_real_gloo_run_allocates(schedule):
    spec = load_model_file(None)
    planned = [_step_growth(trace_step(spec, _settings(schedule, r), batch_size=MICRO)) for r in range(2)]
    results = run_on_gloo_ranks(_measure, 2, schedule)
    measured = [results[r] for r in range(2)]
    # the schedule's sends may finish a few bytes' bookkeeping apart; nothing of a tensor
    assert np.abs(np.array(planned) - np.array(measured)).max() <= 64, (planned, measured)


def test_estimate_plans_every_rank_and_reports_the_heaviest():
    run = RunSpec(precision="fp32", pp=2, pp_schedule="1f1b", grad_accum=MICRO_BATCHES, seq_len=SEQ, batch_size=MICRO)
    plan = estimate(PlanConfig(run=run, strategies=("single", "ddp"), gpus=(2, 4), device="cpu"), processes=1)
    by = {(e.strategy, e.gpus): e for e in plan.estimates}
    assert set(by) == {("single", 2), ("ddp", 2), ("ddp", 4)}
    for e in plan.estimates:
        assert [s.pp_rank for s in e.stages] == [0, 1]
        assert e.peak_bytes == max(s.peak_bytes for s in e.stages)
        heaviest = max(e.stages, key=lambda s: s.peak_bytes).pp_rank
        assert e.peak_rank == heaviest * (e.gpus // 2)
        assert [s.in_flight for s in e.stages] == [2, 1]
        assert e.pp == 2 and e.pp_schedule == "1f1b"
    assert by[("ddp", 4)].dp == 2
    # DDP's buckets: one more copy of each rank's gradients
    for single, ddp in zip(by[("single", 2)].stages, by[("ddp", 2)].stages):
        assert ddp.peak_bytes - single.peak_bytes == 4 * single.num_params
    assert plan.model.num_params == sum(s.num_params for s in by[("single", 2)].stages)


def test_refusals_are_one_line():
    with pytest.raises(UsageError, match="--pp combines with single, ddp, fsdp2 .* not zero2"):
        RunSpec(pp=2, grad_accum=2).check_strategies(("zero2",))
    with pytest.raises(UsageError, match="--tp combines with"):
        RunSpec(pp=2, tp=2, grad_accum=2).check_strategies(("ddp",))
    RunSpec(pp=2, tp=2, grad_accum=2).check_strategies(("fsdp2",))  # torchtitan's 3-D layout
    with pytest.raises(UsageError, match="needs at least --pp"):
        RunSpec(pp=4, grad_accum=2)
    with pytest.raises(UsageError, match="does not divide gpus=6"):
        RunSpec(pp=4, grad_accum=4).check_world(6)
    blocks = str(FIXTURES / "tp_blocks.py")
    with pytest.raises(UsageError, match="define pipeline_stage"):
        estimate(PlanConfig(run=RunSpec(model=blocks, pp=2, grad_accum=2), strategies=("single",), gpus=(2,),
                            device="cpu"), processes=1)
