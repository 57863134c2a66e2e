"""One rank of a tensor-parallel plan, traced: the parameters are its DTensor shards and the
activations a block keeps are the ones torch's DTensor keeps, counted by hand on
tests/fixtures/tp_blocks.py (x + fc2(relu(fc1(LayerNorm(x)))), fp32, no biases in the MLP)."""

from pathlib import Path

import numpy as np
import pytest

from dpplan.config import PlanConfig, RunSpec
from dpplan.errors import UsageError
from dpplan.planner.estimate import estimate
from dpplan.planner.trace import OPTIMIZER_STATE, TRACE_BATCH_SIZE, TraceSettings, trace_step
from dpplan.planner.trace.index import trace_index
from dpplan.training.model_file import load_model_file

BLOCKS = str(Path(__file__).parents[1] / "fixtures" / "tp_blocks.py")
SEQ, HIDDEN, VOCAB = 16, 64, 512
SBH = TRACE_BATCH_SIZE * SEQ * HIDDEN * 4  # one fp32 hidden-state tensor at the trace batch
LN_STATS = 2 * TRACE_BATCH_SIZE * SEQ * 4  # LayerNorm's saved mean and rstd, one per token


def _trace(tp: int, sp: bool = False):
    return trace_step(load_model_file(BLOCKS), TraceSettings(precision="fp32", tp=tp, sequence_parallel=sp))


def _kept_by_blocks(trace) -> int:
    """Activation bytes alive when backward starts that the blocks' modules made."""
    start = trace_index(trace).backward_starts[0]
    alive = np.zeros(len(trace.storage_bytes), dtype=np.int64)
    np.add.at(alive, trace.event_storage[:start], trace.event_sign[:start])
    blocks = [i for i, name in enumerate(trace.module_names) if name.startswith("blocks.")]
    kept = (alive > 0) & np.isin(trace.storage_module, blocks)
    return int(trace.storage_bytes[kept].sum())


@pytest.mark.parametrize("tp", [2, 4])
def test_parameters_are_this_ranks_shards(tp):
    """Column-wise fc1 and the head keep 1/tp of their rows, row-wise fc2 1/tp of its columns,
    the embedding 1/tp of the vocabulary; the norms are whole on every rank."""
    shapes = {p.name: p.shape for p in _trace(tp).params}
    assert shapes["blocks.0.mlp.fc1.weight"] == (4 * HIDDEN // tp, HIDDEN)
    assert shapes["blocks.0.mlp.fc2.weight"] == (HIDDEN, 4 * HIDDEN // tp)
    assert shapes["embed.weight"] == (VOCAB // tp, HIDDEN)
    assert shapes["head.weight"] == (VOCAB // tp, HIDDEN)
    assert shapes["blocks.1.norm.weight"] == (HIDDEN,)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_activations(tp):
    """Each block keeps its input x (for the residual's LayerNorm), the LayerNorm output
    (fc1's input, whole on every rank), relu's output (1/tp of the 4h features) and the norm's
    statistics: 2 x (sbh + sbh + 4 sbh / tp) + stats."""
    expected = 2 * (SBH + SBH + 4 * SBH // tp + LN_STATS)
    assert _kept_by_blocks(_trace(tp)) == expected


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_keeps_the_gathered_input(tp):
    """With sequence parallelism the residual stream and the norm are split along the sequence,
    but fc1's input is the all-gathered whole sequence, and DTensor keeps that for backward:
    2 x (sbh / tp + sbh + 4 sbh / tp) + stats / tp, not the sbh / tp per layer norm output that
    Megatron's formula (Korthikanti et al. 2022, sbh(34/t)) counts."""
    expected = 2 * (SBH // tp + SBH + 4 * SBH // tp + LN_STATS // tp)
    assert _kept_by_blocks(_trace(tp, sp=True)) == expected


def test_estimate_carries_the_layout():
    plan = estimate(PlanConfig(run=RunSpec(model=BLOCKS, precision="fp32", tp=2, sequence_parallel=True),
                               strategies=("single", "fsdp2"), gpus=(2, 8), device="cpu"), processes=1)
    layouts = {(e.strategy, e.gpus): (e.dp, e.tp, e.pp, e.cp, e.ep, e.sp) for e in plan.estimates}
    assert layouts == {
        ("single", 2): (1, 2, 1, 1, 1, True), ("fsdp2", 2): (1, 2, 1, 1, 1, True), ("fsdp2", 8): (4, 2, 1, 1, 1, True),
    }
    # the model summary counts the whole model, not one rank's shards
    assert plan.model.num_params == sum(p.numel for p in _trace(1).params)
    by = {(e.strategy, e.gpus): e for e in plan.estimates}
    # FSDP2 shards over the 4 data-parallel ranks what tensor parallelism left on the rank
    assert by[("fsdp2", 8)].breakdown["optimizer"] * 4 == pytest.approx(by[("fsdp2", 2)].breakdown["optimizer"], rel=0.01)


@pytest.mark.parametrize("strategies, gpus, message", [
    (("zero2",), (4,), "--tp combines with single, fsdp2"),
    (("ddp",), (4,), "DDP over tensor parallelism is not supported"),
    (("fsdp2",), (6,), "--tp 4 does not divide gpus=6"),
])
def test_refused_layouts(strategies, gpus, message):
    tp = 4 if 6 in gpus else 2
    with pytest.raises(UsageError, match=message):
        PlanConfig(run=RunSpec(model=BLOCKS, tp=tp), strategies=strategies, gpus=gpus)


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(UsageError, match="needs tensor parallelism"):
        RunSpec(sequence_parallel=True)


@pytest.mark.parametrize("sp", [False, True])
def test_every_parameter_gets_its_gradient_and_state(sp):
    """Parameters a plan keeps whole (the norms here: replicated DTensors computing on their
    local tensors) get gradients and optimizer state like the split ones."""
    trace = _trace(2, sp)
    assert all(p.grad_storage >= 0 for p in trace.params)
    owners = set(trace.storage_owner[trace.storage_category == OPTIMIZER_STATE].tolist())
    assert owners == set(range(len(trace.params)))


def test_a_module_kept_whole_computes_on_plain_tensors(write_model):
    """An op DTensor has no rule for (floor_divide, as Mixtral's expert routing uses) runs in a
    module the plan keeps whole."""
    path = write_model(MODEL_WITH_ROUTING)
    trace = trace_step(load_model_file(path), TraceSettings(precision="fp32", tp=2))
    assert {p.name: p.shape for p in trace.params}["router.weight"] == (8, 8)  # whole


MODEL_WITH_ROUTING = """
    import torch
    import torch.nn as nn

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8, 8))

        def forward(self, x):
            scores = x @ self.weight
            return scores * (torch.arange(8, device=x.device) // 2).to(scores.dtype)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(self.fc1(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))
            self.router = Router()

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.router(x)

    def build_model(): return Net()
    def example_batch(b): return torch.randn(b, 4, 8)
"""
