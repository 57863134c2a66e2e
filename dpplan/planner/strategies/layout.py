"""The parallel layout one rank is planned under, and the strategy registry."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from dpplan.planner.strategies.zero_settings import DEFAULT_ZERO, ZeroSettings

STRATEGIES = (
    "single", "dp", "ddp", "ddp-zero1", "zero1", "zero2", "zero3",
    "fsdp-full", "fsdp-grad-op", "fsdp-no-shard", "fsdp-hybrid", "fsdp2",
)
"""Every strategy name dpplan plans, in display order (``--strategy`` values)."""

DEEPSPEED_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
"""DeepSpeed's ZeRO strategies and their stage numbers."""

_MODULE_OF = {
    "single": "single",
    "dp": "data_parallel",
    "ddp": "ddp",
    "ddp-zero1": "ddp_zero1",
    "zero1": "zero",
    "zero2": "zero",
    "zero3": "zero",
    "fsdp-full": "fsdp1",
    "fsdp-grad-op": "fsdp1",
    "fsdp-no-shard": "fsdp1",
    "fsdp-hybrid": "fsdp1",
    "fsdp2": "fsdp2",
}


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where one rank sits and what it runs. Sizes are per rank."""

    strategy: str
    world_size: int
    """Total ranks (GPUs)."""
    num_nodes: int = 1
    rank: int = 0
    precision: str = "fp32"
    grad_accum: int = 1
    offload: str = "none"
    """none, optimizer, optimizer+params"""
    device_type: str = "cuda"
    """cuda: NCCL collectives; cpu: gloo collectives (what a CPU validation run does)."""
    zero: ZeroSettings = DEFAULT_ZERO
    """DeepSpeed's settings (zero1/2/3 only)."""

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.num_nodes

    def with_rank(self, rank: int) -> "Layout":
        from dataclasses import replace

        return replace(self, rank=rank)


def strategy_module(strategy: str) -> ModuleType:
    if strategy not in _MODULE_OF:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return importlib.import_module(f"dpplan.planner.strategies.{_MODULE_OF[strategy]}")
