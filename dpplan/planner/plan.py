"""What a plan says: the records ``estimate.py`` returns and the reports draw.

Torch-free on purpose: reading a saved plan or profile back (``dpplan report``, the profile's
``from_json``) needs these records, not the tracer behind them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpplan.config import PlanConfig


@dataclass(frozen=True, kw_only=True)
class ModuleActivation:
    name: str
    class_name: str
    activation_bytes: int
    """Bytes this module's forward keeps for backward, per micro-batch."""


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    name: str
    path: str
    num_params: int
    num_trainable_params: int
    num_units: int
    unit_names: list[str]
    checkpointing: str
    top_activation_modules: list[ModuleActivation]
    trace_seconds: float
    num_traced_ops: int
    repeated_layers: int = 0
    """0: every layer was traced; else the model's stack of that many alike layers was traced
    at three and four layers and built to full depth (checked against the four-layer trace)."""


@dataclass(frozen=True, kw_only=True)
class StrategyEstimate:
    """One strategy at one GPU count: the memory of its most loaded rank."""

    strategy: str
    gpus: int
    nodes: int
    batch_size: int
    grad_accum: int
    precision: str
    optimizer: str
    activation_checkpointing: bool
    offload: str
    device: str
    gpu: str | None
    breakdown: dict[str, int]
    """Bytes at the peak by kind: params, grads, optimizer, activations, other."""
    peak_bytes: int
    """The largest per-rank peak: device memory on cuda (what NVML shows), tensor bytes on cpu."""
    peak_allocated_bytes: int
    """Comparable to torch.cuda.max_memory_allocated (cpu: live tensor bytes)."""
    peak_reserved_bytes: int
    """Comparable to torch.cuda.max_memory_reserved (cpu: same as allocated)."""
    peak_rank: int
    peak_phase: str
    capacity_bytes: int
    fits: bool
    max_batch_size: int
    """Largest micro-batch per rank whose peak fits ``capacity_bytes`` (0: none)."""
    host_bytes: int | None = None
    """Host RAM per node that offload needs (None without offload)."""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Plan:
    config: PlanConfig
    model: ModelSummary
    estimates: list[StrategyEstimate]
    unsupported: dict[str, str] = field(default_factory=dict)
    """Strategies asked for that the real wrapper refuses for this model, with what it says."""
