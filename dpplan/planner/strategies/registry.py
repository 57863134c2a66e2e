"""Every strategy dpplan plans, declared once: what wraps the model, the mesh it runs on, what
it supports. The CLI, the configs, the planner, the profiler and the real runs read it here.

Importing this module imports no torch (the CLI builds its options from it at start-up); a
strategy's planning functions live in the module ``StrategyInfo.module`` names, loaded by
``planner_of`` on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from dpplan.errors import UsageError
from dpplan.planner.strategies.mesh import Mesh

if TYPE_CHECKING:
    from dpplan.planner.strategies.protocol import StrategyPlanner


class Wrapper(StrEnum):
    """What the real run wraps the model in (profiler/parallelize.py builds it)."""

    NONE = "none"
    DATA_PARALLEL = "nn.DataParallel"
    DDP = "DistributedDataParallel"
    DDP_ZERO1 = "DistributedDataParallel + ZeroRedundancyOptimizer"
    DEEPSPEED = "deepspeed.initialize"
    FSDP1 = "FullyShardedDataParallel"
    FSDP2 = "fully_shard"


class DataAxes(StrEnum):
    """How a data-parallel strategy spreads its ranks over the mesh."""

    ONE = "one rank"
    REPLICATE = "dp_replicate"
    SHARD = "dp_shard"
    HYBRID = "dp_replicate x dp_shard"
    """Replicas across nodes, shards inside a node (HSDP: FSDP1 HYBRID_SHARD's 2-D mesh)."""


@dataclass(frozen=True, kw_only=True)
class StrategyInfo:
    name: str
    """The ``--strategy`` value."""
    module: str
    """strategies/<module>.py plans it (see protocol.StrategyPlanner)."""
    wrapper: Wrapper
    data_axes: DataAxes
    casts_parameters: bool = False
    """Mixed precision casts the parameters to the low dtype (FSDP's MixedPrecision, DeepSpeed's
    bf16/fp16 engine) instead of running the forward under autocast."""
    casts_buffers: bool = False
    """Mixed precision also casts floating buffers (FSDP1 MixedPrecision.buffer_dtype)."""
    offload: bool = False
    """Optimizer (and parameter) offload to host memory exists for it."""
    single_device: bool = False
    """Only ever one GPU."""
    deepspeed_stage: int | None = None
    fsdp1_sharding: str | None = None
    """FSDP1's ``ShardingStrategy`` member."""
    not_runnable: str | None = None
    """Why ``dpplan profile`` cannot launch it (None: it can)."""

    def mesh(self, world_size: int, num_nodes: int = 1, *, tp: int = 1, ep: int = 1, pp: int = 1, cp: int = 1) -> Mesh:
        """The mesh this strategy puts ``world_size`` ranks on (``num_nodes`` nodes): ``pp``
        pipeline stages outermost, its data axes over ``world_size / (pp tp)`` ranks, each a ``tp``
        group of neighbours (torchtitan's layout: tp innermost, inside a node); ``ep`` of its
        shard ranks split the experts."""
        if world_size % (tp * pp * cp):
            raise UsageError(f"--tp {tp} x --pp {pp} x --cp {cp} does not divide {world_size} GPUs")
        dp = world_size // (tp * pp * cp)
        if self.data_axes is DataAxes.ONE:
            if dp != 1:
                raise UsageError(f"{self.name} runs on one GPU (asked for {world_size})" if tp * pp == 1 else
                                 f"{self.name} means no data parallelism: --gpus must equal --tp x --pp "
                                 f"({tp * pp}), not {world_size}")
            return Mesh(tp=tp, pp=pp, num_nodes=num_nodes)
        if self.data_axes is DataAxes.REPLICATE:
            return Mesh(dp_replicate=dp, tp=tp, pp=pp, num_nodes=num_nodes)
        if self.data_axes is DataAxes.SHARD:
            return Mesh(dp_shard=dp, cp=cp, tp=tp, ep=ep, pp=pp, num_nodes=num_nodes)
        if dp % num_nodes:
            raise UsageError(f"{self.name}: {dp} data-parallel ranks do not split into {num_nodes} nodes")
        return Mesh(dp_replicate=num_nodes, dp_shard=dp // num_nodes, tp=tp, pp=pp, num_nodes=num_nodes)


def _fsdp1(name: str, sharding: str, axes: DataAxes) -> StrategyInfo:
    return StrategyInfo(name=name, module="fsdp1", wrapper=Wrapper.FSDP1, data_axes=axes, casts_parameters=True,
                        casts_buffers=True, offload=True, fsdp1_sharding=sharding)


def _zero(stage: int) -> StrategyInfo:
    return StrategyInfo(name=f"zero{stage}", module="zero", wrapper=Wrapper.DEEPSPEED, data_axes=DataAxes.SHARD,
                        casts_parameters=True, offload=True, deepspeed_stage=stage)


REGISTRY: dict[str, StrategyInfo] = {info.name: info for info in (
    StrategyInfo(name="single", module="single", wrapper=Wrapper.NONE, data_axes=DataAxes.ONE, single_device=True),
    StrategyInfo(name="dp", module="data_parallel", wrapper=Wrapper.DATA_PARALLEL, data_axes=DataAxes.REPLICATE,
                 not_runnable="dp (nn.DataParallel) is one process driving every GPU, not one process per GPU: "
                              "estimate only"),
    StrategyInfo(name="ddp", module="ddp", wrapper=Wrapper.DDP, data_axes=DataAxes.REPLICATE),
    StrategyInfo(name="ddp-zero1", module="ddp_zero1", wrapper=Wrapper.DDP_ZERO1, data_axes=DataAxes.SHARD),
    _zero(1), _zero(2), _zero(3),
    _fsdp1("fsdp-full", "FULL_SHARD", DataAxes.SHARD),
    _fsdp1("fsdp-grad-op", "SHARD_GRAD_OP", DataAxes.SHARD),
    _fsdp1("fsdp-no-shard", "NO_SHARD", DataAxes.REPLICATE),
    _fsdp1("fsdp-hybrid", "HYBRID_SHARD", DataAxes.HYBRID),
    StrategyInfo(name="fsdp2", module="fsdp2", wrapper=Wrapper.FSDP2, data_axes=DataAxes.SHARD,
                 casts_parameters=True, offload=True),
)}

STRATEGIES = tuple(REGISTRY)
"""Every strategy name dpplan plans, in display order (``--strategy`` values)."""

TENSOR_PARALLEL_STRATEGIES = ("single", "fsdp2")
"""The data-parallel strategies that run over the dp ranks of a tensor-parallel mesh: FSDP2
takes DTensor modules (torchtitan's 2-D layouts); ``single`` when dp = 1. Not DDP: torchtitan
refuses it ("DDP has not supported > 1D parallelism", torchtitan/models/llama3/infra/
parallelize.py), and torch 2.13's DDP-over-TP hooks (torch/distributed/tensor/parallel/ddp.py
``_pre_dp_module_transform``) leave the module with no parameters after the first forward
(measured: ``named_parameters()`` empty on 4 gloo ranks), which breaks gradient
accumulation's memory and every tool that walks the parameters."""

CONTEXT_PARALLEL_STRATEGIES = ("fsdp2",)
"""The data-parallel strategy planned beside context parallelism: FSDP2 over the dp x cp ranks
(torchtitan's ``dp_shard_cp`` mesh: the cp ranks hold the same model and shard it too,
torchtitan/distributed/parallel_dims.py)."""

PIPELINE_PARALLEL_STRATEGIES = ("single", "ddp", "fsdp2")
"""The data-parallel strategies planned over the dp ranks of a pipeline: none (``single``: each
rank one stage of the one pipeline), DDP or FSDP2, which torch's ``PipelineStage`` drives
itself (torch/distributed/pipelining/stage.py ``backward_maybe_with_nosync``): DDP's
``no_sync`` on all but the last backward of a step; FSDP2 with gradient sync and resharding
off for every backward and the reduce-scatter in ``perform_reduce_grad`` after the last
(strategies/fsdp2_pipeline.py). FSDP2 is what combines with ``--tp`` too (torchtitan's 3-D
layout: FSDP2 over dp, TP, PP)."""

EXPERT_PARALLEL_STRATEGIES = ("fsdp2",)
"""The data-parallel strategies that run beside expert parallelism: FSDP2, with each experts
module a unit of its own over the ranks that hold the same experts (dp / ep) and the rest over
all dp ranks, as torchtitan composes them (torchtitan/models/llama4/infra/parallelize.py
``apply_fsdp``). Expert parallelism takes its ranks from dp, so dp > 1: no ``single``."""


DEEPSPEED_STAGES = {name: info.deepspeed_stage for name, info in REGISTRY.items() if info.deepspeed_stage}
"""DeepSpeed's ZeRO strategies and their stage numbers."""


def strategy_info(name: str) -> StrategyInfo:
    if name not in REGISTRY:
        raise UsageError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return REGISTRY[name]


def planner_of(name: str) -> StrategyPlanner:
    """The module that plans ``name`` (it satisfies protocol.StrategyPlanner)."""
    return importlib.import_module(f"dpplan.planner.strategies.{strategy_info(name).module}")
