"""Which tensor-parallel plan a model gets (training/tensor_parallel.py), and the checks."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from dpplan.planner.trace.fake_mesh import fake_tp_mesh
from dpplan.training.model_file import build_module, load_model_file
from dpplan.training.tensor_parallel import (
    GatherSequence,
    ScatterSequence,
    TensorParallelError,
    apply_tensor_parallel,
    tensor_parallel_plan,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _model(name: str) -> nn.Module:
    with torch.device("meta"):
        return build_module(load_model_file(str(FIXTURES / name)))


def _kinds(plan: dict) -> dict[str, str]:
    return {path: type(style).__name__ for path, style in plan.items()}


def test_megatron_rule_splits_each_pair_and_the_vocabulary():
    kinds = _kinds(tensor_parallel_plan(_model("tp_blocks.py"), 2, False))
    assert kinds == {
        "embed": "RowwiseParallel", "head": "ColwiseParallel",
        "blocks.0.mlp.fc1": "ColwiseParallel", "blocks.0.mlp.fc2": "RowwiseParallel",
        "blocks.1.mlp.fc1": "ColwiseParallel", "blocks.1.mlp.fc2": "RowwiseParallel",
    }


def test_sequence_parallel_rule_adds_norms_and_the_sequence_gathers():
    plan = tensor_parallel_plan(_model("tp_blocks.py"), 2, True)
    assert isinstance(plan["blocks.0"], ScatterSequence)  # the stream is split entering the first block
    assert isinstance(plan["blocks.0.mlp"], GatherSequence) and isinstance(plan["blocks.1.mlp"], GatherSequence)
    assert isinstance(plan["blocks.0.norm"], SequenceParallel) and isinstance(plan["blocks.1.norm"], SequenceParallel)
    assert isinstance(plan["blocks.0.mlp.fc2"], RowwiseParallel)


def test_hugging_face_plan_is_the_models_own():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    kinds = _kinds(tensor_parallel_plan(model, 2, False))
    for layer in (0, 1):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert kinds[f"model.layers.{layer}.self_attn.{name}"] == "ColwiseParallel"
        assert kinds[f"model.layers.{layer}.self_attn.o_proj"] == "RowwiseParallel"
        assert kinds[f"model.layers.{layer}.mlp.down_proj"] == "RowwiseParallel"
    assert kinds["lm_head"] == "ColwiseParallel"
    with pytest.raises(TensorParallelError, match="num_key_value_heads=2"):
        tensor_parallel_plan(model, 4, False)


def test_the_model_files_plan_wins():
    def user_plan(model, sequence_parallel):
        return {"blocks.0.mlp.fc1": ColwiseParallel()}

    assert _kinds(tensor_parallel_plan(_model("tp_blocks.py"), 2, False, user_plan)) == {
        "blocks.0.mlp.fc1": "ColwiseParallel"}


@pytest.mark.parametrize("sp", [False, True])
def test_applied_every_parameter_is_a_dtensor(sp):
    """What the plan leaves whole (the norms; with sp the norms are SequenceParallel's) is kept
    whole as replicated DTensors: one kind of tensor for GPU optimizers' foreach kernels."""
    model = _model("tp_blocks.py")
    with fake_tp_mesh(2) as mesh:
        apply_tensor_parallel(model, mesh, tensor_parallel_plan(model, 2, sp))
        placements = {name: p.placements for name, p in model.named_parameters()}
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert placements["blocks.0.norm.weight"] == (Replicate(),)
    assert placements["blocks.0.mlp.fc1.weight"] == (Shard(0),)


def test_indivisible_features_are_refused_by_name():
    with pytest.raises(TensorParallelError, match="tp=3 does not divide the 512-row embedding embed"):
        tensor_parallel_plan(_model("tp_blocks.py"), 3, False)

    def user_plan(model, sequence_parallel):
        return {"blocks.0.mlp.fc1": ColwiseParallel(), "blocks.0.mlp.fc2": RowwiseParallel()}

    with pytest.raises(TensorParallelError, match="does not divide the 256 output features of blocks.0.mlp.fc1"):
        tensor_parallel_plan(_model("tp_blocks.py"), 3, False, user_plan)


def test_a_model_without_known_projections_asks_for_a_plan():
    with pytest.raises(TensorParallelError, match="define tp_plan"):
        tensor_parallel_plan(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), 2, False)


def test_sequence_parallel_needs_blocks_with_their_own_attention_and_mlp():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

    assert tensor_parallel_plan(Net(), 2, False)  # plain tensor parallelism splits them
    with pytest.raises(TensorParallelError, match="holds its projections directly"):
        tensor_parallel_plan(Net(), 2, True)


def test_each_rank_must_hold_whole_key_value_heads():
    """The zoo's Llama has 2 KV heads of 32 features: tp 4 would leave 16 features of k per rank.
    The model declares no head count, but its attention declares head_dim."""
    with torch.device("meta"):
        llama = build_module(load_model_file(str(FIXTURES.parents[1] / "benchmarks" / "models" / "llama.py")))
    assert tensor_parallel_plan(llama, 2, False)
    with pytest.raises(TensorParallelError, match="leaves layers.0.attn.k 16 output features per rank, not whole heads of 32"):
        tensor_parallel_plan(llama, 4, False)
