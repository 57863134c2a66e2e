"""Where one rank sits and what it runs: the mesh, the rank, and the run's settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dpplan.errors import UsageError
from dpplan.planner.strategies.mesh import Mesh
from dpplan.planner.strategies.registry import StrategyInfo, strategy_info
from dpplan.planner.strategies.zero_settings import DEFAULT_ZERO, ZeroSettings

PLANNED_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""The mesh axes the planner plans: the data axes by the strategies' state transforms, tp (and
ep, which takes its ranks from dp_shard) and pp by tracing one rank of the parallel program
(planner/trace/fake_mesh.py, planner/trace/pipeline_rank.py), cp by tracing a rank's share of
the sequence with ring attention's buffers by rule (planner/context_parallel.py)."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One rank of a mesh under a strategy. Sizes are per rank."""

    strategy: str
    mesh: Mesh
    rank: int = 0
    precision: str = "fp32"
    grad_accum: int = 1
    offload: str = "none"
    """none, optimizer, optimizer+params"""
    device_type: str = "cuda"
    """cuda: NCCL collectives; cpu: gloo collectives (what a CPU validation run does)."""
    zero: ZeroSettings = DEFAULT_ZERO
    """DeepSpeed's settings (zero1/2/3 only)."""

    def __post_init__(self):
        unplanned = [a.name for a in self.mesh.axes() if a.name not in PLANNED_AXES]
        if unplanned:
            raise UsageError(f"{', '.join(unplanned)} parallelism is not planned yet (mesh {self.mesh.describe()})")
        if not 0 <= self.rank < self.mesh.world_size:
            raise UsageError(f"rank {self.rank} is outside a mesh of {self.mesh.world_size} ranks")

    @classmethod
    def of(
        cls, strategy: str, world_size: int, num_nodes: int = 1, *, tp: int = 1, ep: int = 1, pp: int = 1, cp: int = 1,
        **settings,
    ) -> Layout:
        """The layout of ``strategy`` on ``world_size`` ranks over ``num_nodes`` nodes, in
        ``pp`` stages of groups of ``tp``, ``ep`` of its shard ranks splitting the experts (its
        registry entry decides the data axes)."""
        mesh = strategy_info(strategy).mesh(world_size, num_nodes, tp=tp, ep=ep, pp=pp, cp=cp)
        return cls(strategy=strategy, mesh=mesh, **settings)

    @property
    def info(self) -> StrategyInfo:
        return strategy_info(self.strategy)

    @property
    def world_size(self) -> int:
        """Total ranks (GPUs)."""
        return self.mesh.world_size

    @property
    def dp_shard_size(self) -> int:
        """Ranks a sharding strategy splits parameters, gradients or state over: dp_shard, with
        the cp ranks beside it (they hold the same model: torchtitan's ``dp_shard_cp``)."""
        return self.mesh.dp_shard * self.mesh.cp

    @property
    def dp_shard_rank(self) -> int:
        """This rank's index in its shard group (cp is the inner part of it)."""
        return self.mesh.coordinate(self.rank, "dp_shard") * self.mesh.cp + self.mesh.coordinate(self.rank, "cp")

    @property
    def expert_shard_size(self) -> int:
        """Ranks that hold the same experts and shard them (dp_shard / ep): the mesh of an
        experts module's FSDP unit."""
        return self.mesh.dp_shard // self.mesh.ep

    @property
    def expert_shard_rank(self) -> int:
        """This rank's index among them: ep is the inner part of dp_shard (the ranks of an
        expert group are neighbours), so it is the outer coordinate."""
        return self.dp_shard_rank // self.mesh.ep

    @property
    def num_nodes(self) -> int:
        return self.mesh.num_nodes

    @property
    def ranks_per_node(self) -> int:
        return self.mesh.ranks_per_node

    def with_rank(self, rank: int) -> Layout:
        return replace(self, rank=rank)
