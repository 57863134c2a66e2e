"""Wrap a real model for one strategy, exactly as dpplan's estimate assumes.

Each strategy's wrapper (strategies/registry.py ``Wrapper``) is torch's own, with its defaults:
  single          no wrapper
  dp              nn.DataParallel (on CPU a plain call, as torch does without GPUs)
  ddp             DistributedDataParallel (gradient_as_bucket_view=False, 25 MiB buckets)
  ddp-zero1       DDP + torch.distributed.optim.ZeroRedundancyOptimizer
  zero1, zero2, zero3
                  DeepSpeed's ZeRO stages through deepspeed.initialize (profiler/deepspeed_run.py)
  fsdp-full, fsdp-grad-op, fsdp-no-shard, fsdp-hybrid
                  FSDP1 with that ShardingStrategy, use_orig_params=True, one unit per
                  planned unit module (see training/units.py) plus the root
  fsdp2           fully_shard on each unit, then on the root (reshard after forward)

With tensor parallelism (``--tp``; the model's layers already DTensors over the mesh's "tp"
dimension, training/tensor_parallel.py) the wrapper runs over the data-parallel sub-mesh
``dp_mesh`` only, as torchtitan composes them: fsdp2 ``fully_shard(..., mesh=dp_mesh)`` (FSDP2
shards DTensor parameters along dp, a 2-D layout), single no wrapper (dp = 1). DDP is refused
with tensor parallelism (strategies/registry.py ``TENSOR_PARALLEL_STRATEGIES`` says why).
With expert parallelism (``--ep``) each experts module is first an FSDP2 unit of its own over
the ranks that hold the same experts (profiler/expert_parallel_run.py).

Offload (``--offload optimizer`` or ``optimizer+params``) on cuda, as the planner plans it:
FSDP1 CPUOffload(offload_params=True), FSDP2 CPUOffloadPolicy(); torch has no optimizer-only
offload for either (planner/strategies/fsdp1.py, fsdp2.py). Other strategies, and every cpu
run, run without offload, as they are planned.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpplan.errors import UsageError
from dpplan.planner.strategies.registry import (
    EXPERT_PARALLEL_STRATEGIES,
    TENSOR_PARALLEL_STRATEGIES,
    DataAxes,
    Wrapper,
    strategy_info,
)
from dpplan.planner.strategies.zero_settings import DEFAULT_ZERO, ZeroSettings
from dpplan.profiler.deepspeed_run import cast_inputs, engine_no_sync, initialize_engine
from dpplan.training.optimizers import build_optimizer, optimizer_class_and_kwargs
from dpplan.training.training_step import LOW_PRECISION_DTYPE


@dataclass(frozen=True, kw_only=True)
class PreparedRun:
    """A wrapped model and everything the training step needs to drive it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    uses_autocast: bool
    no_sync: Callable[[], contextlib.AbstractContextManager] | None
    grad_scaler: Any | None
    backward: Callable[[torch.Tensor], None] | None = None
    """Replaces ``loss.backward()`` (DeepSpeed's ``engine.backward``)."""
    cast_batch: Callable[[Any], Any] = lambda batch: batch
    """What the training loop does to each batch before the forward (DeepSpeed: dtype)."""


def _fsdp2_no_sync(model) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return no_sync


def parallelize(
    model: nn.Module,
    strategy: str,
    *,
    units: list[nn.Module],
    precision: str,
    optimizer_name: str,
    device: torch.device,
    num_nodes: int = 1,
    offload: str = "none",
    batch_size: int = 1,
    grad_accum: int = 1,
    zero: ZeroSettings = DEFAULT_ZERO,
    dp_mesh: Any = None,
    experts: Any = None,
) -> PreparedRun:
    """Wrap ``model`` (already on ``device``, checkpointing already applied). ``dp_mesh``: the
    data-parallel dimension of a tensor- or expert-parallel run's mesh (module docstring); None
    without, where the wrapper spans the whole world. ``experts``: an expert-parallel run's
    ``ExpertUnits`` (profiler/expert_parallel_run.py), each experts module a unit of its own."""
    info = strategy_info(strategy)
    if dp_mesh is not None and strategy not in TENSOR_PARALLEL_STRATEGIES:
        raise UsageError(f"{strategy} does not run over a tensor-parallel mesh ({', '.join(TENSOR_PARALLEL_STRATEGIES)} do)")
    if experts is not None and strategy not in EXPERT_PARALLEL_STRATEGIES:
        raise UsageError(f"{strategy} does not run beside expert parallelism ({', '.join(EXPERT_PARALLEL_STRATEGIES)} does)")
    device_type = device.type
    low_dtype = LOW_PRECISION_DTYPE.get(precision)
    mixed = precision in ("bf16-mixed", "fp16-mixed")
    offload_to_host = offload != "none" and device_type == "cuda"
    if precision == "bf16":
        model.to(torch.bfloat16)

    if info.wrapper is Wrapper.DEEPSPEED:
        engine, optimizer = initialize_engine(
            model, strategy, precision=precision, optimizer_name=optimizer_name, device=device,
            offload=offload, batch_size=batch_size, grad_accum=grad_accum, zero=zero,
        )
        # torch_autocast: the engine's forward runs under autocast; the step's loss does too,
        # as it is traced (one autocast region around forward and loss).
        return PreparedRun(
            model=engine, optimizer=optimizer, uses_autocast=zero.torch_autocast, no_sync=engine_no_sync(engine),
            grad_scaler=None, backward=functools.partial(engine.backward, scale_wrt_gas=False),
            cast_batch=functools.partial(cast_inputs, precision=precision, torch_autocast=zero.torch_autocast),
        )

    if info.wrapper in (Wrapper.NONE, Wrapper.DATA_PARALLEL, Wrapper.DDP, Wrapper.DDP_ZERO1):
        no_sync = None
        if info.wrapper is Wrapper.DATA_PARALLEL and device_type == "cuda":
            model = nn.DataParallel(model)
        elif info.wrapper in (Wrapper.DDP, Wrapper.DDP_ZERO1):
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [device.index] if device_type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
            no_sync = model.no_sync
        if info.wrapper is Wrapper.DDP_ZERO1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            cls, kwargs = optimizer_class_and_kwargs(optimizer_name, device_type=device_type)
            optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
        else:
            optimizer = build_optimizer(optimizer_name, model.parameters(), device_type=device_type)
        scaler = torch.amp.GradScaler(device_type) if precision == "fp16-mixed" else None
        return PreparedRun(model=model, optimizer=optimizer, uses_autocast=True, no_sync=no_sync, grad_scaler=scaler)

    if info.wrapper is Wrapper.FSDP1:
        from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        unit_ids = {id(u) for u in units}
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in unit_ids)
        mixed_precision = (
            MixedPrecision(param_dtype=low_dtype, reduce_dtype=low_dtype, buffer_dtype=low_dtype) if mixed else None
        )
        extra: dict[str, Any] = {}
        if offload_to_host:
            from torch.distributed.fsdp import CPUOffload

            extra["cpu_offload"] = CPUOffload(offload_params=True)
        if info.data_axes is DataAxes.HYBRID:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = info.mesh(torch.distributed.get_world_size(), num_nodes)
            extra["device_mesh"] = init_device_mesh(
                device_type, (mesh.dp_replicate, mesh.dp_shard), mesh_dim_names=("replicate", "shard")
            )
        assert info.fsdp1_sharding is not None, f"{strategy} is FSDP1 and names its ShardingStrategy"
        model = FullyShardedDataParallel(
            model,
            sharding_strategy=getattr(ShardingStrategy, info.fsdp1_sharding),
            auto_wrap_policy=policy if units else None,
            mixed_precision=mixed_precision,
            use_orig_params=True,
            device_id=device,
            **extra,
        )
        # With offload the parameters, and so the optimizer step, live on the host.
        optimizer = build_optimizer(optimizer_name, model.parameters(), device_type="cpu" if offload_to_host else device_type)
        scaler = None
        if precision == "fp16-mixed":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(device_type)
        return PreparedRun(
            model=model, optimizer=optimizer, uses_autocast=False, no_sync=model.no_sync, grad_scaler=scaler
        )

    assert info.wrapper is Wrapper.FSDP2, info
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=low_dtype, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    extra = {}
    if offload_to_host:
        from torch.distributed.fsdp import CPUOffloadPolicy

        extra["offload_policy"] = CPUOffloadPolicy()
    if experts is not None:  # inner units first: each owns its experts' weights
        from torch.distributed.tensor import Shard

        from dpplan.training.expert_parallel import expert_shard_dim

        ranks = experts.mesh.size()
        for module in experts.modules:
            fully_shard(module, mp_policy=mp_policy, mesh=experts.mesh,
                        shard_placement_fn=lambda p: Shard(expert_shard_dim(tuple(p.shape), ranks)), **extra)
            module.set_gradient_divide_factor(experts.gradient_divide_factor)
            if device_type == "cpu" and experts.mesh.size() > 1:
                # a custom factor reduces with NCCL's PREMUL_SUM, which gloo lacks: divide in place
                # before and after a sum instead (_fsdp_collectives.py _get_gradient_divide_factors)
                module.set_force_sum_reduction_for_comms(True)
    if dp_mesh is not None:
        extra["mesh"] = dp_mesh
    for unit in units:
        fully_shard(unit, mp_policy=mp_policy, **extra)
    fully_shard(model, mp_policy=mp_policy, **extra)
    optimizer = build_optimizer(optimizer_name, model.parameters(), device_type="cpu" if offload_to_host else device_type)
    scaler = torch.amp.GradScaler(device_type) if precision == "fp16-mixed" else None
    return PreparedRun(
        model=model, optimizer=optimizer, uses_autocast=False, no_sync=_fsdp2_no_sync(model), grad_scaler=scaler
    )
