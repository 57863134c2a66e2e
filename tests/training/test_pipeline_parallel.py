"""Pipeline parallelism (training/pipeline_layout.py, pipeline_parallel.py): how layers split
into stages, which stages a rank holds, the schedule checks, and a real 2-rank gloo step of
each of torch's schedules whose gradients equal the unsplit model's."""

import contextlib
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dpplan.models import default_gpt
from dpplan.training import pipeline_parallel as pipeline
from dpplan.training.pipeline_layout import SCHEDULES, PipelineError, PipelineLayout, check_layout, split_layers
from tests.gloo_ranks import run_on_gloo_ranks

SPEC = SimpleNamespace(name="gpt", pipeline_stage=default_gpt.pipeline_stage, pipeline_loss=default_gpt.pipeline_loss)
"""The bundled GPT's hooks, on a small GPT (4 layers: 4 stages for the two-stage-per-rank schedules)."""
MICRO_BATCHES, MICRO_BATCH, SEQ = 4, 2, 16
RTOL = 1e-4


def _small_gpt():
    return default_gpt.GPT(vocab=128, seq=SEQ, hidden=32, layers=4, heads=4)


def test_layers_split_evenly_in_order_the_first_stages_one_more():
    assert split_layers(6, 2) == [range(0, 3), range(3, 6)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]


def test_fewer_layers_than_stages_is_refused():
    with pytest.raises(PipelineError, match="^4 pipeline stages need at least 4 layers; the model has 3$"):
        split_layers(3, 4)


@pytest.mark.parametrize(("schedule", "rank", "stages"), [
    ("gpipe", 1, (1,)),
    ("1f1b", 0, (0,)),
    ("interleaved-1f1b", 0, (0, 2)),  # looped: r and r + pp
    ("zero-bubble", 1, (1, 3)),
    ("zbv", 0, (0, 3)),  # the V: r and 2 pp - 1 - r
    ("zbv", 1, (1, 2)),
])
def test_each_schedule_gives_a_rank_its_stages(schedule, rank, stages):
    layout = PipelineLayout(pp=2, schedule=schedule, num_micro_batches=4)
    assert layout.stages_of(rank) == stages
    assert layout.num_stages == 2 * len(stages)


@pytest.mark.parametrize(("layout", "message"), [
    (PipelineLayout(pp=2, schedule="dualpipe"), "unknown --pp-schedule 'dualpipe'; choose one of gpipe, 1f1b, "
                                                "interleaved-1f1b, zero-bubble, zbv"),
    (PipelineLayout(pp=2, schedule="interleaved-1f1b", num_micro_batches=3),
     "--pp-schedule interleaved-1f1b needs --grad-accum (micro-batches) divisible by --pp 2; got 3"),
    (PipelineLayout(pp=4, schedule="1f1b", num_micro_batches=2),
     "--pp-schedule 1f1b needs at least --pp (4) micro-batches per step (--grad-accum); got 2"),
])
def test_a_schedule_torch_cannot_run_is_refused_in_one_line(layout, message):
    with pytest.raises(PipelineError, match=f"^{re.escape(message)}$"):
        check_layout(layout)


def test_gpipe_runs_with_fewer_micro_batches_than_ranks():
    check_layout(PipelineLayout(pp=4, schedule="gpipe", num_micro_batches=1))


def test_a_model_without_hooks_that_is_no_decoder_is_refused():
    with pytest.raises(PipelineError, match="define pipeline_stage"):
        pipeline.stage_module(SimpleNamespace(name="mlp.py"), torch.nn.Linear(2, 2), 0, 2)


def _step_gradients(schedule: str, rank: int, world: int) -> float:
    """The largest relative gradient error of this rank's stages after one pipeline step of
    ``schedule``, against the unsplit model on the same micro-batches."""
    layout = PipelineLayout(pp=world, schedule=schedule, num_micro_batches=MICRO_BATCHES)
    torch.manual_seed(0)
    model = _small_gpt()
    torch.manual_seed(0)
    reference = _small_gpt()
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (MICRO_BATCHES * MICRO_BATCH, SEQ))
    indices = layout.stages_of(rank)
    stages = [pipeline.stage_module(SPEC, model, i, layout.num_stages) for i in range(layout.num_stages)]
    shapes = pipeline.boundary_shapes(stages, ids.tensor_split(MICRO_BATCHES)[0])
    schedule_ = pipeline.build_schedule([stages[i] for i in indices], indices, layout, shapes,
                                        pipeline.stage_loss(SPEC, model), torch.device("cpu"))
    pipeline.run_pipeline_step(schedule_, layout, indices, ids, ids, autocast=contextlib.nullcontext())
    # the schedule averages the micro-batches' losses (its gradient scaling)
    loss = sum(reference(input_ids=m, labels=m) for m in ids.tensor_split(MICRO_BATCHES)) / MICRO_BATCHES
    loss.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    worst, checked = 0.0, 0
    for index in indices:
        for param in stages[index].parameters():
            expected = reference.get_parameter(names[id(param)]).grad
            assert param.grad is not None, (schedule, index, names[id(param)])
            worst = max(worst, ((param.grad - expected).norm() / expected.norm()).item())
            checked += 1
    assert checked > 0
    return worst


def _rank(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for schedule in SCHEDULES:
        results[(rank, schedule)] = _step_gradients(schedule, rank, world)
        dist.barrier()
    dist.destroy_process_group()


def test_every_schedule_on_two_ranks_gives_the_unsplit_models_gradients():
    world = 2
    errors = run_on_gloo_ranks(_rank, world)
    for schedule in SCHEDULES:
        for rank in range(world):
            assert errors[(rank, schedule)] < RTOL, (schedule, rank, errors[(rank, schedule)])
