"""What a rank of a real tensor-parallel run (``--tp N``) does beyond a data-parallel one.

The run's ranks form a 2-D mesh (dp, tp), tp innermost. The model is split over "tp" with
the plan the tracer traces (training/tensor_parallel.py), before checkpointing and the
data-parallel wrapper over "dp" (profiler/parallelize.py), torchtitan's order
(torchtitan/models/llama3/infra/parallelize.py). The ranks of one tp group are one model
replica: they draw one batch, and the rank result records what shows that they computed one
loss, beside the parameter bytes the split left each rank (worker.py writes it as
``tensor_parallel`` in rank<R>.json).

Imported only when a run has tensor parallelism (it imports torch.distributed.tensor).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from dpplan.config import RunConfig
from dpplan.errors import UsageError
from dpplan.planner.strategies.registry import TENSOR_PARALLEL_STRATEGIES
from dpplan.training.model_file import ModelSpec
from dpplan.training.tensor_parallel import apply_tensor_parallel, tensor_parallel_plan
from dpplan.training.training_step import default_loss


def tensor_parallel_mesh(config: RunConfig, world: int, device_type: str) -> DeviceMesh:
    """The (dp, tp) mesh of the run. tp is the inner dimension, as torchtitan lays it out
    (torchtitan/distributed/parallel_dims.py): neighbouring ranks, on one node where tp fits
    in one, form a tp group, whose collectives run in every layer; dp's run once a step."""
    tp = config.run.tp
    if world % tp:
        raise UsageError(f"--tp {tp} does not divide the {world} ranks of the run")
    dp = world // tp
    if config.strategy == "single" and dp > 1:
        wrappers = ", ".join(s for s in TENSOR_PARALLEL_STRATEGIES if s != "single")
        raise UsageError(f"--strategy single with --tp {tp} runs on {tp} ranks, not {world}: "
                         f"the other ranks need a data-parallel wrapper ({wrappers})")
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def data_parallel_seed(config: RunConfig, rank: int) -> int:
    """The seed of ``rank``: its data-parallel coordinate, so that the ranks of one tp group
    build the same model and draw the same batch (a tp group computes on one batch)."""
    return config.seed + rank // config.run.tp


def split_model(model: nn.Module, spec: ModelSpec, config: RunConfig, mesh: DeviceMesh) -> dict[str, int]:
    """Split ``model`` (on its device) over the mesh's "tp" dimension, exactly as the tracer
    does; returns this rank's parameter bytes after the split (``parameter_bytes``)."""
    plan = tensor_parallel_plan(model, config.run.tp, config.run.sequence_parallel, spec.tp_plan)
    apply_tensor_parallel(model, mesh["tp"], plan)
    return parameter_bytes(model)


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """This rank's parameter bytes after the split, before any data-parallel wrapper: the local
    shards of the parameters split over tp, and the parameters every tp rank holds whole."""
    split = whole = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        size = local.numel() * local.element_size()
        if isinstance(param, DTensor) and any(p.is_shard() for p in param.placements):
            split += size
        else:
            whole += size
    return {"split_param_bytes": split, "replicated_param_bytes": whole}


def recording_loss(loss_fn: Callable | None, losses: list[float]) -> Callable:
    """``loss_fn`` (None: the default loss) that also appends each micro-batch's loss value to
    ``losses``. ``.item()`` allocates no tensor (a Python float from the scalar's storage), so
    the cpu measurement is unchanged; on cuda it waits for the forward once per micro-batch."""

    def recording(output, batch):
        loss = loss_fn(output, batch) if loss_fn is not None else default_loss(output)
        losses.append(loss.detach().item())
        return loss

    return recording


def batch_digest(batch: Any) -> str:
    """SHA-256 of a batch's tensors' bytes, in order (dict keys sorted). Take it after the
    timed steps: the copy to the host of a cuda batch must not move a measured peak."""
    digest = hashlib.sha256()

    def visit(value):
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value):
                visit(value[key])
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    visit(batch)
    return digest.hexdigest()


def rank_record(config: RunConfig, mesh: DeviceMesh, split_bytes: dict[str, int], losses: list[float],
                batch: Any) -> dict:
    """The ``tensor_parallel`` object of rank<R>.json."""
    return {
        "tp": config.run.tp,
        "dp": mesh["dp"].size(),
        "tp_rank": mesh["tp"].get_local_rank(),
        "dp_rank": mesh["dp"].get_local_rank(),
        "sequence_parallel": config.run.sequence_parallel,
        **split_bytes,
        "losses": losses,
        "batch_sha256": batch_digest(batch),
    }
