"""Expert parallelism (training/expert_parallel.py): which modules are split, the checks, and a
real 2-rank gloo run whose outputs and gradients equal the unsplit model's."""


import pytest
import torch
import torch.distributed as dist

from dpplan.training.expert_parallel import (
    ExpertParallelError,
    apply_expert_parallel,
    balanced_counts,
    check_expert_parallel,
    experts_modules,
)
from dpplan.training.model_file import build_module, load_model_file
from tests.conftest import FIXTURES
from tests.gloo_ranks import run_on_gloo_ranks

transformers = pytest.importorskip("transformers")

EXPERTS = 4


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2, use_cache=False)
    return transformers.MixtralForCausalLM(config).train()


def test_finds_each_layers_experts_module_of_a_hugging_face_moe():
    with torch.device("meta"):
        model = _mixtral()
    found = experts_modules(model)
    assert [name for name, _ in found] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_a_model_without_experts_or_with_experts_ep_does_not_divide_is_refused():
    with torch.device("meta"):
        dense = build_module(load_model_file(str(FIXTURES / "tiny_gpt.py")))
        moe = _mixtral()
    with pytest.raises(ExpertParallelError, match="no experts module"):
        check_expert_parallel(dense, 2)
    with pytest.raises(ExpertParallelError, match="--ep 3 does not divide the 4 experts of model.layers.0.mlp.experts"):
        check_expert_parallel(moe, 3)


def test_experts_shard_on_dim_1_only_where_dim_0_cannot_split_them():
    from dpplan.training.expert_parallel import expert_shard_dim

    assert expert_shard_dim((4, 256, 64), 2) == 0  # 2 experts each
    assert expert_shard_dim((1, 256, 64), 2) == 1  # one expert: split it
    assert expert_shard_dim((1, 255, 64), 2) == 0  # FSDP2 shards other dims only evenly
    assert expert_shard_dim((1, 256, 64), 1) == 0


def test_the_planners_router_sends_every_rank_an_equal_share():
    destination = torch.zeros(10, dtype=torch.long)  # the values do not matter: the shares do
    assert balanced_counts(destination, 4, None) == ([3, 3, 2, 2], [3, 3, 2, 2])


def _rank(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    reference = _mixtral()
    torch.manual_seed(0)
    model = _mixtral()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    split = {id(p) for module in apply_expert_parallel(model, mesh) for p in module.parameters(recurse=False)}
    torch.manual_seed(100 + rank)  # each rank its own batch, as data-parallel ranks have
    ids = torch.randint(0, 128, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    batches = [None] * world
    dist.all_gather_object(batches, ids)
    reference_losses = [reference(input_ids=b, labels=b).loss for b in batches]
    (sum(reference_losses) / world).backward()  # the data-parallel average
    worst = 0.0
    for param, whole in zip(model.parameters(), reference.parameters()):
        grad = param.grad
        if id(param) in split:  # this rank's experts: their gradients sum every rank's tokens
            rows = param.shape[0]
            expected, grad = whole.grad[rank * rows:(rank + 1) * rows], grad / world
        else:
            dist.all_reduce(grad)
            expected, grad = whole.grad, grad / world
        worst = max(worst, (grad - expected).abs().max().item())
    results[rank] = (loss.item(), reference_losses[rank].item(), worst)
    dist.destroy_process_group()


def test_two_ranks_compute_the_unsplit_models_loss_and_gradients():
    world = 2
    results = run_on_gloo_ranks(_rank, world)
    for rank in range(world):
        loss, reference, worst_grad_error = results[rank]
        assert loss == pytest.approx(reference, rel=1e-5)
        assert worst_grad_error < 1e-5
