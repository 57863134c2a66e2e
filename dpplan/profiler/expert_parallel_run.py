"""What a rank of a real expert-parallel run (``--ep N``) does beyond a data-parallel one.

Expert parallelism takes its ranks from data parallelism: the dp ranks form a 2-D mesh
(edp, ep), ep innermost (neighbouring ranks exchange tokens every MoE layer; torchtitan's
layout, torchtitan/distributed/parallel_dims.py). Each experts module is split over "ep"
(training/expert_parallel.py, as the tracer splits it), and becomes an FSDP2 unit of its own
over "edp", the ranks that hold the same experts, before the layers' units and the root are
sharded over all dp ranks (torchtitan/models/llama4/infra/parallelize.py ``apply_fsdp``).

Imported only when a run has expert parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dpplan.config import RunConfig
from dpplan.errors import UsageError
from dpplan.training.expert_parallel import apply_expert_parallel


@dataclass(frozen=True)
class ExpertMeshes:
    dp: DeviceMesh
    """Every data-parallel rank: what the layers' and the root's FSDP2 units shard over."""
    edp: DeviceMesh
    """The ranks holding the same experts: what an experts unit shards over."""
    ep: DeviceMesh
    """The ranks that split the experts and exchange tokens."""


@dataclass(frozen=True)
class ExpertUnits:
    """The experts modules of a split model, for the data-parallel wrapper (profiler/parallelize.py)."""

    modules: list[nn.Module]
    mesh: DeviceMesh
    """edp: what each experts unit shards over."""
    gradient_divide_factor: int
    """dp: an expert weight's gradient sums the losses of its whole expert group (training/
    expert_parallel.py), so its unit divides by every data-parallel rank, not by its own."""
    param_bytes: int
    """This rank's expert weights after the split, before the wrapper shards them."""


def expert_meshes(config: RunConfig, world: int, device_type: str) -> ExpertMeshes:
    ep = config.run.ep
    if world % ep:
        raise UsageError(f"--ep {ep} does not divide the {world} ranks of the run")
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    return ExpertMeshes(dp=mesh._flatten("dp"), edp=mesh["edp"], ep=mesh["ep"])


def split_experts(model: nn.Module, meshes: ExpertMeshes) -> ExpertUnits:
    """Split ``model``'s experts over "ep", exactly as the tracer does."""
    modules = apply_expert_parallel(model, meshes.ep)
    local = sum(p.numel() * p.element_size() for m in modules for p in m.parameters(recurse=False))
    return ExpertUnits(modules=modules, mesh=meshes.edp, gradient_divide_factor=meshes.dp.size(), param_bytes=local)


def rank_record(config: RunConfig, meshes: ExpertMeshes, units: ExpertUnits) -> dict[str, Any]:
    """The ``expert_parallel`` object of rank<R>.json: where the rank sits, what it holds."""
    return {
        "ep": config.run.ep,
        "ep_rank": meshes.ep.get_local_rank(),
        "edp": meshes.edp.size(),
        "edp_rank": meshes.edp.get_local_rank(),
        "experts_modules": len(units.modules),
        "expert_param_bytes": units.param_bytes,
    }
