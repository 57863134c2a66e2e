"""What a rank of a real pipeline-parallel run (``--pp N``) does beyond a data-parallel one.

The run's ranks form a mesh (pp, dp, tp), pp outermost and tp innermost, torchtitan's order
(torchtitan/distributed/parallel_dims.py: ``["pp", "dp_replicate", "dp_shard", "cp", "tp"]``),
so a tp group is neighbouring ranks and a pipeline's stages are ``dp x tp`` ranks apart.
Dimensions of size 1 other than pp (and dp under DDP) are left out of the mesh (no process
group is made for them).

A rank builds the whole model (the same on every rank of a pipeline: one seed per dp
coordinate), cuts every stage with the model's hooks (training/pipeline_parallel.py), keeps
the stages its schedule gives it and drops the rest before anything is measured. Each kept
stage is split over "tp" first when tp > 1 (training/tensor_parallel.py, the plan computed for
the stage module), then checkpointed per unit, then wrapped over "dp", torchtitan's order
(torchtitan/models/llama3/infra/parallelize.py): in DDP for ``ddp``, or for ``fsdp2`` with
``fully_shard`` on each unit and then on the stage module (each stage its own FSDP root),
``reshard_after_forward=False`` as torchtitan's default under a pipeline (``apply_fsdp``:
"do not reshard after forward to avoid per-microbatch all-gathers"). torch's ``PipelineStage``
drives either itself (torch/distributed/pipelining/stage.py): DDP's ``no_sync`` on all but the
last backward (``backward_maybe_with_nosync``); FSDP2 with gradient sync and resharding off for
every backward, then ``perform_reduce_grad`` after the step's last: each group's
post_backward reduce-scatters the accumulated unsharded gradients and reshards. Under
bf16-mixed FSDP2 computes in bf16 through its MixedPrecisionPolicy (no autocast), so the
stage boundaries are bf16 too. The optimizer holds this rank's parameters only.

The step: torch's schedule runs every micro-batch's forward and backward
(``run_pipeline_step``), then the optimizer step (training/training_step.py). The recorder's
phases: the whole schedule is one "micro_batch" phase, whose "backward" mark is the rank's
first backward of the step: "forward" is the warm-up forwards before it (all forwards with
GPipe), "backward" the rest, where 1F1B's steady state interleaves forwards and backwards
(there is no forward-only or backward-only time after it); "optimizer" follows.

Imported only when a run has pipeline parallelism.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dpplan.config import RunConfig
from dpplan.errors import UsageError
from dpplan.training.model_file import ModelSpec, build_module, example_batch_for
from dpplan.training.pipeline_parallel import (
    PipelineLayout,
    boundary_shapes,
    build_schedule,
    pipeline_batch,
    run_pipeline_step,
    stage_loss,
    stage_module,
    stage_units,
)
from dpplan.training.training_step import autocast_context, run_optimizer_step
from dpplan.training.units import checkpoint_units, find_units


@dataclass(frozen=True, kw_only=True)
class PipelineMeshes:
    """The run's mesh and the sizes of its three dimensions."""

    mesh: DeviceMesh
    pp: int
    dp: int
    tp: int

    def group(self, name: str) -> Any:
        """The process group of dimension ``name``; None for a dimension of size 1."""
        return self.mesh.get_group(name) if name in (self.mesh.mesh_dim_names or ()) else None

    def local_rank(self, name: str) -> int:
        return self.mesh.get_local_rank(name) if name in (self.mesh.mesh_dim_names or ()) else 0


@dataclass(frozen=True, kw_only=True)
class PipelineRank:
    """This rank's part of the pipeline, built and ready to step."""

    layout: PipelineLayout
    stage_indices: tuple[int, ...]
    modules: list[nn.Module]
    """The kept stages, wrapped (DDP) where the strategy wraps them."""
    optimizer: torch.optim.Optimizer
    schedule: Any
    contents: list[list[str]]
    """What each kept stage owns, by the full model's module paths (``stage_contents``)."""
    num_params: int
    """Parameters of the kept stages, whole (before any tensor-parallel split)."""
    param_bytes: int
    """This rank's parameter bytes (local shards after a tensor-parallel or FSDP2 split)."""
    uses_autocast: bool = True
    """False where FSDP2's MixedPrecisionPolicy casts instead (bf16-mixed fsdp2)."""


def check_pipeline_run(config: RunConfig) -> None:
    """What the real runs cannot do yet, as one line (the planner may plan it)."""
    if config.run.precision == "fp16-mixed":
        # a loss scaler per rank would judge inf/nan on its own stages only, and the ranks'
        # scales drift apart; torchtitan trains pipelines in bf16
        raise UsageError("--pp runs bf16-mixed, bf16 or fp32, not fp16-mixed (one loss scale for every stage "
                         "is not implemented)")
    if config.run.sequence_parallel:
        raise UsageError("--pp with --sp is not run yet (a stage's boundary would be sequence-sharded)")


def pipeline_meshes(config: RunConfig, world: int, device_type: str) -> PipelineMeshes:
    """The (pp, dp, tp) mesh of the run; dp = world / (pp tp)."""
    check_pipeline_run(config)
    pp, tp = config.run.pp, config.run.tp
    if world % (pp * tp):
        raise UsageError(f"--pp {pp} x --tp {tp} does not divide the {world} ranks of the run")
    dp = world // (pp * tp)
    if config.strategy == "single" and dp > 1:
        raise UsageError(f"--strategy single with --pp {pp} runs on {pp * tp} ranks (pp x tp), not {world}: "
                         "the other ranks need --strategy ddp")
    # ddp and fsdp2 keep their dimension at size 1 too: over no group they would span the world
    kept = {"pp", "dp"} if config.strategy in ("ddp", "fsdp2") else {"pp"}
    dims = [(name, size) for name, size in (("pp", pp), ("dp", dp), ("tp", tp)) if size > 1 or name in kept]
    mesh = init_device_mesh(device_type, tuple(s for _, s in dims), mesh_dim_names=tuple(n for n, _ in dims))
    return PipelineMeshes(mesh=mesh, pp=pp, dp=dp, tp=tp)


def data_parallel_seed(config: RunConfig, rank: int, world: int) -> int:
    """The seed of ``rank``: its dp coordinate (rank = (pp_rank dp + dp_rank) tp + tp_rank), so
    that every rank of one pipeline builds the same model and draws the same batch, and the
    dp ranks draw different ones."""
    dp = max(1, world // (config.run.pp * config.run.tp))
    return config.seed + (rank // config.run.tp) % dp


def stage_contents(model: nn.Module, stage: nn.Module) -> list[str]:
    """What ``stage`` owns, named by ``model``'s module paths in model order: each run of the
    model's layer units (training/units.py) as ``blocks 0-2``, every other parameter's module
    by its path (``tok_emb``, ``lm_head``)."""
    units = find_units(model)
    unit_of = {id(p): index for index, unit in enumerate(units) for p in unit.parameters()}
    paths = {id(m): path for path, m in model.named_modules()}
    held = {id(p) for p in stage.parameters()}
    contents: list[str] = []
    run: list[int] = []

    def close_run():
        if run:
            prefix = paths[id(units[run[0]])].rpartition(".")[0] or "layers"
            contents.append(f"{prefix} {run[0]}" if len(run) == 1 else f"{prefix} {run[0]}-{run[-1]}")
            run.clear()

    for name, param in model.named_parameters():
        if id(param) not in held:
            continue
        unit = unit_of.get(id(param))
        if unit is None:
            close_run()
            owner = name.rpartition(".")[0] or name
            if owner not in contents:
                contents.append(owner)
        elif not run or unit == run[-1] + 1:
            run.append(unit)
        elif unit != run[-1]:
            close_run()
            run.append(unit)
    close_run()
    return contents


def _unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def _casts_parameters(config: RunConfig) -> bool:
    """Whether the stages compute in bf16 through FSDP2's MixedPrecisionPolicy (no autocast)."""
    return config.strategy == "fsdp2" and config.run.precision == "bf16-mixed"


def _fully_shard_stage(module: nn.Module, units: list[nn.Module], dp_mesh: DeviceMesh, precision: str) -> nn.Module:
    """``fully_shard`` each unit, then the stage (module docstring), as profiler/parallelize.py
    shards a whole model but kept unsharded between a step's forwards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dpplan.training.training_step import LOW_PRECISION_DTYPE

    low = LOW_PRECISION_DTYPE.get(precision)
    mp_policy = (MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if precision == "bf16-mixed"
                 else MixedPrecisionPolicy())
    for unit in units:
        fully_shard(unit, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)
    fully_shard(module, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return module  # the same module, its class now also an FSDPModule


def _meta_shapes(spec: ModelSpec, config: RunConfig, layout: PipelineLayout) -> list:
    """The stages' boundary tensors for one micro-batch, traced on a meta copy of the model
    and a meta batch: no memory, no random numbers drawn (every rank's generator stays where
    the seed put it), and the real parameters stay on their device (meta inputs cannot meet
    cuda weights)."""
    with torch.device("meta"):
        model = build_module(spec)
        micro_input, _ = pipeline_batch(example_batch_for(spec, config.run.batch_size, config.run.seq_len))
    if config.run.precision == "bf16" or _casts_parameters(config):
        model.to(torch.bfloat16)
    stages = [stage_module(spec, model, i, layout.num_stages) for i in range(layout.num_stages)]
    return boundary_shapes(stages, micro_input)


def build_pipeline_rank(spec: ModelSpec, config: RunConfig, meshes: PipelineMeshes,
                        device: torch.device) -> PipelineRank:
    """This rank's stages of ``spec``'s model, split, checkpointed, wrapped, with their
    optimizer and schedule (module docstring). Call under the seed of ``data_parallel_seed``."""
    layout = PipelineLayout(pp=meshes.pp, schedule=config.run.pp_schedule, num_micro_batches=config.run.grad_accum)
    indices = layout.stages_of(meshes.local_rank("pp"))
    shapes = _meta_shapes(spec, config, layout)
    # on cuda built on its GPU directly (as worker.py builds every model); the stages not kept
    # are freed, and the cache returned, before anything is measured
    with (torch.device(device) if device.type == "cuda" else contextlib.nullcontext()):
        model = build_module(spec)
    model = model.to(device)
    loss_fn = stage_loss(spec, model)
    all_stages = [stage_module(spec, model, i, layout.num_stages) for i in range(layout.num_stages)]
    modules = [all_stages[i] for i in indices]
    contents = [stage_contents(model, m) for m in modules]
    num_params = sum(p.numel() for p in _unique_parameters(modules))
    del model, all_stages
    gc.collect()  # module graphs can hold cycles: free the dropped stages' parameters now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if config.run.precision == "bf16":
        for module in modules:
            module.to(torch.bfloat16)
    tp_mesh = meshes.mesh["tp"] if meshes.tp > 1 else None
    for module in modules:
        if tp_mesh is not None:
            from dpplan.training.tensor_parallel import apply_tensor_parallel, tensor_parallel_plan

            apply_tensor_parallel(module, tp_mesh, tensor_parallel_plan(module, meshes.tp, False, spec.tp_plan))
        if config.run.activation_checkpointing:
            checkpoint_units(module, stage_units(module, config.run.wrap))
    if config.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        modules = [DistributedDataParallel(m, device_ids=device_ids, process_group=meshes.group("dp"))
                   for m in modules]
    elif config.strategy == "fsdp2":
        modules = [_fully_shard_stage(m, stage_units(m, config.run.wrap), meshes.mesh["dp"], config.run.precision)
                   for m in modules]
    params = _unique_parameters(modules)
    param_bytes = sum(_local(p).numel() * _local(p).element_size() for p in params)
    from dpplan.training.optimizers import build_optimizer

    optimizer = build_optimizer(config.run.optimizer, params, device_type=device.type)
    schedule = build_schedule(modules, indices, layout, shapes, loss_fn, device, group=meshes.group("pp"))
    return PipelineRank(layout=layout, stage_indices=indices, modules=modules, optimizer=optimizer, schedule=schedule,
                        contents=contents, num_params=num_params, param_bytes=param_bytes,
                        uses_autocast=not _casts_parameters(config))


def _local(param: torch.Tensor) -> torch.Tensor:
    to_local = getattr(param, "to_local", None)  # a DTensor's shard on this rank
    return to_local() if callable(to_local) else param


def _schedule_stages(schedule: Any) -> list[Any]:
    # torch keeps them as PipelineScheduleSingle._stage and PipelineScheduleMulti._stages
    # (torch/distributed/pipelining/schedules.py)
    stages = getattr(schedule, "_stages", None)
    return list(stages) if stages is not None else [schedule._stage]


def run_step(rank: PipelineRank, batch: Any, *, precision: str, device_type: str,
             on_phase: Callable[[str], contextlib.AbstractContextManager],
             before_backward: Callable[[], None]) -> None:
    """One optimizer step of this rank: the schedule (phase "micro_batch", ``before_backward``
    at the rank's first backward), then the optimizer (phase "optimizer")."""
    inputs, target = pipeline_batch(batch)
    started = [False]
    stages = _schedule_stages(rank.schedule)
    originals = [stage.backward_one_chunk for stage in stages]

    def first_backward(original, *args, **kwargs):
        if not started[0]:
            started[0] = True
            before_backward()
        return original(*args, **kwargs)

    for stage, original in zip(stages, originals):
        stage.backward_one_chunk = functools.partial(first_backward, original)
    try:
        with on_phase("micro_batch"):
            run_pipeline_step(rank.schedule, rank.layout, rank.stage_indices, inputs, target,
                              autocast=autocast_context(precision, device_type, rank.uses_autocast))
    finally:
        for stage, original in zip(stages, originals):
            stage.backward_one_chunk = original
    with on_phase("optimizer"):
        run_optimizer_step(rank.optimizer, None)


def rank_record(config: RunConfig, meshes: PipelineMeshes, rank: PipelineRank) -> dict[str, Any]:
    """The ``pipeline`` object of rank<R>.json: where the rank sits, what it holds."""
    return {
        "pp": meshes.pp,
        "pp_rank": meshes.local_rank("pp"),
        "dp": meshes.dp,
        "dp_rank": meshes.local_rank("dp"),
        "tp": meshes.tp,
        "tp_rank": meshes.local_rank("tp"),
        "schedule": rank.layout.schedule,
        "num_micro_batches": rank.layout.num_micro_batches,
        "num_stages": rank.layout.num_stages,
        "stages": list(rank.stage_indices),
        "owns": rank.contents,
        "num_params": rank.num_params,
        "param_bytes": rank.param_bytes,
    }
