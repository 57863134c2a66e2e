"""The device mesh one plan runs on: named parallel axes, after torchtitan's ``ParallelDims``.

torchtitan (torchtitan/distributed/parallel_dims.py) lays the ranks out as one mesh with the
axes ``pp, dp_replicate, dp_shard, cp, tp``, outermost first: ranks that differ only in ``tp``
are neighbours (the same node, over NVLink), ``pp`` and ``dp_replicate`` groups step over
whole blocks of ranks (across nodes). Expert parallelism borrows its ranks from
``dp_shard x cp`` (torchtitan's rule), so it does not multiply the world size.

A data-parallel strategy is a mesh plus the wrapper on its axes: DDP replicates over
``dp_replicate``, ZeRO and FSDP shard over ``dp_shard``, HSDP (fsdp-hybrid) does both. The
other axes stay 1 until tensor, context, expert and pipeline parallelism are planned; a mesh
asks for them with ``tp``, ``cp``, ``ep`` and ``pp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from dpplan.errors import UsageError

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""The mesh's axes that multiply the world size, outermost first (torchtitan's order)."""


class MeshAxis(NamedTuple):
    """One axis of the mesh as a process group sees it."""

    name: str
    size: int
    """Ranks in each of this axis's groups."""
    stride: int
    """Rank distance between neighbours of a group (the product of the inner axes' sizes)."""
    spans_nodes: bool
    """Whether a group's ranks sit on more than one node (its traffic leaves the node)."""


@dataclass(frozen=True, kw_only=True)
class Mesh:
    """Sizes of the parallel axes and the nodes they are laid out over."""

    dp_replicate: int = 1
    """Data-parallel replicas: whole model copies whose gradients are all-reduced (DDP, HSDP's outer axis)."""
    dp_shard: int = 1
    """Data-parallel shards: parameters, gradients or optimizer state split over these ranks (ZeRO, FSDP)."""
    cp: int = 1
    """Context parallelism: the sequence split over these ranks inside attention."""
    tp: int = 1
    """Tensor parallelism: each layer's weights split over these ranks."""
    pp: int = 1
    """Pipeline parallelism: the layers split into this many stages."""
    ep: int = 1
    """Expert parallelism: the experts split over these ranks, taken from dp_shard x cp."""
    num_nodes: int = 1

    def __post_init__(self):
        for name in (*AXES, "ep", "num_nodes"):
            if getattr(self, name) < 1:
                raise UsageError(f"mesh axis {name} must be >= 1 (got {getattr(self, name)})")
        if self.world_size % self.num_nodes:
            raise UsageError(f"{self.world_size} ranks do not split evenly into {self.num_nodes} nodes")
        if (self.dp_shard * self.cp) % self.ep:
            raise UsageError(f"ep={self.ep} must divide dp_shard x cp = {self.dp_shard * self.cp}")
        for axis in self.axes():
            block = axis.size * axis.stride
            if block % self.ranks_per_node and self.ranks_per_node % block:
                # a group would hold some nodes' ranks partly: no launcher lays ranks out so
                raise UsageError(
                    f"mesh axis {axis.name} (size {axis.size}) straddles nodes of {self.ranks_per_node} ranks unevenly"
                )

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.num_nodes

    @property
    def dp_size(self) -> int:
        """Ranks that see different data: the batch the world trains on is this x the micro-batch."""
        return self.dp_replicate * self.dp_shard

    def degrees(self) -> dict[str, int]:
        """The layout as plans report it: dp (replicas x shards), tp, pp, cp and ep."""
        return {"dp": self.dp_size, "tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep}

    def axes(self) -> list[MeshAxis]:
        """Every axis of size > 1, outermost first."""
        stride = self.world_size
        axes = []
        for name in AXES:
            size = getattr(self, name)
            stride //= size
            if size > 1:
                axes.append(MeshAxis(name, size, stride, size * stride > self.ranks_per_node))
        return axes

    def axis(self, name: str) -> MeshAxis:
        """One axis by name (size 1 when the mesh does not use it)."""
        for axis in self.axes():
            if axis.name == name:
                return axis
        if name not in AXES:
            raise UsageError(f"unknown mesh axis {name!r}; choose from {', '.join(AXES)}")
        return MeshAxis(name, 1, 1, False)

    def coordinate(self, rank: int, name: str) -> int:
        """This rank's index along axis ``name``."""
        axis = self.axis(name)
        return (rank // axis.stride) % axis.size

    def describe(self) -> str:
        """e.g. ``dp_replicate=2 x dp_shard=8 over 2 nodes``."""
        axes = " x ".join(f"{a.name}={a.size}" for a in self.axes()) or "1 rank"
        return f"{axes} over {self.num_nodes} node{'s' * (self.num_nodes > 1)}"
