"""Expert parallelism (``--ep N``): each MoE layer's experts split over N data-parallel ranks.

The experts modules dpplan splits follow the interface Hugging Face models share
(transformers 5: ``MixtralExperts``, ``Qwen3MoeExperts``, ``OlmoeExperts``, ...): a module
with an integer ``num_experts``, its weights stacked along dim 0 (one row per expert), and
``forward(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``
returning the weighted expert output per token. A rank keeps its ``num_experts / N``
consecutive experts and runs them on the (token, choice) pairs every rank of its expert
group routes to them, exchanged by two all-to-alls (dispatch and combine), as torchtitan
(torchtitan/distributed/expert_parallel.py) and GShard do. The ranks of an expert group hold
different batches: expert parallelism divides the data-parallel ranks, it adds none.

What the trace cannot know is how many pairs each rank sends where: that is the router's
choice on data. The planner assumes a balanced router (every rank sends ``tokens · k / N``
pairs to every rank), the same assumption it makes for one-hot routing masks
(planner/data_dependent.py); the real run exchanges the real counts.

Gradients: the combine's backward sends each expert the gradients of every rank's tokens, so
an expert weight's gradient sums the expert group's losses, where the data-parallel wrapper
averages the others over dp. The real run's FSDP2 unit of an experts module therefore divides
by dp, not by its own ranks (``set_gradient_divide_factor``, as torchtitan does in
torchtitan/models/llama4/infra/parallelize.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dpplan.errors import UsageError

EXPERTS_FORWARD = ("hidden_states", "top_k_index", "top_k_weights")

RouteCounts = Callable[[torch.Tensor, int, Any], tuple[list[int], list[int]]]
"""``(destination rank of each pair, ep, group) -> (pairs sent to each rank, received from each)``."""


class ExpertParallelError(UsageError):
    """A model that cannot be split by expert, or counts that do not divide (exit code 2)."""


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's experts modules, by path: the interface of the module docstring."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int) or experts < 1:
            continue
        try:
            params = list(inspect.signature(type(module).forward).parameters)[1:4]
        except (TypeError, ValueError):
            continue
        stacked = [p for p in module.parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == experts]
        if tuple(params) == EXPERTS_FORWARD and stacked:
            found.append((name, module))
    return found


def check_expert_parallel(model: nn.Module, ep: int) -> list[tuple[str, nn.Module]]:
    """The experts modules ``--ep ep`` splits, or a one-line error."""
    modules = experts_modules(model)
    if not modules:
        raise ExpertParallelError(
            f"--ep {ep}: the model has no experts module dpplan can split (a module with num_experts, "
            "weights stacked by expert on dim 0 and forward(hidden_states, top_k_index, top_k_weights), "
            "as Hugging Face MoE models have)")
    for name, module in modules:
        experts = int(module.num_experts)  # type: ignore[arg-type]  # an int: experts_modules checked it
        if experts % ep:
            raise ExpertParallelError(f"--ep {ep} does not divide the {experts} experts of {name}")
    return modules


def exchanged_counts(destination: torch.Tensor, ep: int, group: Any) -> tuple[list[int], list[int]]:
    """The real counts: this rank's pairs per destination, and (one all-to-all of the counts)
    the pairs each rank sends here."""
    import torch.distributed as dist

    send = torch.bincount(destination, minlength=ep)
    receive = torch.empty_like(send)
    dist.all_to_all_single(receive, send, group=group)
    return send.tolist(), receive.tolist()


def balanced_counts(destination: torch.Tensor, ep: int, group: Any) -> tuple[list[int], list[int]]:
    """What the planner assumes: every rank sends each rank an equal share of its pairs."""
    pairs = destination.numel()
    share = [pairs // ep + (1 if rank < pairs % ep else 0) for rank in range(ep)]
    return share, share


def apply_expert_parallel(model: nn.Module, ep_mesh: Any, route_counts: RouteCounts = exchanged_counts) -> list[nn.Module]:
    """Split every experts module of ``model`` over ``ep_mesh`` (1-D) in place: this rank's
    rows of the stacked weights, and a forward that exchanges the routed pairs. Returns the
    experts modules (each an FSDP2 unit of its own in the data-parallel wrapper)."""
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    group = ep_mesh.get_group()
    modules = [module for _, module in check_expert_parallel(model, ep)]
    for module in modules:
        total = module.num_experts
        local = total // ep
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 2 and param.shape[0] == total:
                kept = nn.Parameter(param.detach()[rank * local:(rank + 1) * local].clone(),
                                    requires_grad=param.requires_grad)
                setattr(module, name, kept)
        module.num_experts = local
        module.forward = _dispatching_forward(module.forward, local, ep, group, route_counts)
    return modules


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends the gradients back the way the rows came.

    A c10d collective into a new tensor rather than the functional collectives' autograd op:
    that op's outputs, saved under non-reentrant activation checkpointing, kept the forward's
    activations alive beside the recomputed ones (measured on 2 gloo ranks, Hugging Face
    Mixtral: checkpointing raised the step's peak from 6.8 to 9.0 MB instead of lowering it)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, receive: list[int], send: list[int], group: Any) -> torch.Tensor:
        import torch.distributed as dist

        ctx.receive, ctx.send, ctx.group = receive, send, group
        out = rows.new_empty((sum(receive), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return back, None, None, None


def _dispatching_forward(local_forward: Callable, local: int, ep: int, group: Any, route_counts: RouteCounts) -> Callable:
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        k = top_k_index.shape[-1]
        experts = top_k_index.reshape(-1)
        destination = torch.div(experts, local, rounding_mode="floor")
        order = torch.argsort(destination, stable=True)  # pairs grouped by the rank they go to
        token = torch.div(order, k, rounding_mode="floor")
        send, receive = route_counts(destination, ep, group)
        rows = _AllToAll.apply(hidden_states[token], receive, send, group)
        weights = _AllToAll.apply(top_k_weights.reshape(-1)[order], receive, send, group)
        with torch.no_grad():
            local_experts = _AllToAll.apply(experts[order], receive, send, group) % local
        output = local_forward(rows, local_experts.unsqueeze(-1), weights.unsqueeze(-1))
        returned = _AllToAll.apply(output, send, receive, group)
        return torch.zeros_like(hidden_states).index_add_(0, token, returned.to(hidden_states.dtype))

    return forward


def expert_shard_dim(shape: tuple[int, ...], shard_ranks: int) -> int:
    """The dim an experts unit's FSDP2 shards a stacked weight of ``shape`` on over
    ``shard_ranks`` ranks. Dim 0 (FSDP2's default) unless the rank holds fewer experts than
    there are ranks to shard them: dim 0 would then leave every rank a whole expert (one row
    each, padded), so dim 1 splits each expert, as torchtitan's ``shard_placement_fn`` does
    (torchtitan/models/llama4/infra/parallelize.py ``apply_fsdp``); FSDP2 shards dims other
    than 0 only evenly, so an uneven dim 1 stays on dim 0."""
    if len(shape) >= 2 and shape[0] < shard_ranks and shape[1] % shard_ranks == 0:
        return 1
    return 0
