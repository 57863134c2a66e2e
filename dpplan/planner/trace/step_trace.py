"""What a traced training step is: a ``StepTrace``, the birth and death of every tensor storage
of one steady-state step, in order, with what each storage is (parameter, gradient, optimizer
state, activation, ...), plus markers: where each unit's forward and backward start and end,
where each parameter's gradient arrives, where the optimizer step runs. The strategies
(planner/strategies/) replay this timeline with their own parameter, gradient and buffer
lifecycles; ``TraceIndex`` (planner/trace/index.py) reads the markers once for all of them.

Batch size. The step is traced once, at ``TRACE_BATCH_SIZE``, a prime that no model dimension
is a multiple of in practice. A storage whose byte count is a multiple of that prime holds
one (or, for batch x batch tensors such as a contrastive loss, two) batch dimensions; its size
at any other batch size follows exactly. One trace thus answers every batch size, which is what
makes a search for the largest batch that fits cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

TRACE_BATCH_SIZE = 1009
"""The prime micro-batch size the step is traced at (see module docstring)."""

# Storage categories, in the vocabulary of torch's memory profiler.
PARAMETER, BUFFER, INPUT, GRADIENT, OPTIMIZER_STATE, ACTIVATION, TEMPORARY, OPTIMIZER_TEMPORARY, OTHER = range(9)
CATEGORY_NAMES = (
    "parameter", "buffer", "input", "gradient", "optimizer_state", "activation", "temporary",
    "optimizer_temporary", "other",
)

# Precision families: how the model computes under a precision.
AUTOCAST = "autocast"  # fp32 parameters, torch.autocast (single, dp, ddp, zero*)
PARAM_CAST = "param-cast"  # parameters cast to the low dtype for compute (FSDP mixed precision)
# DeepSpeed's "bf16"/"fp16" sections: the engine casts the parameters (not the buffers) to the
# low dtype once, the training loop casts floating inputs (deepspeed/runtime/engine.py
# ``_configure_distributed_model``; transformers/trainer.py ``_prepare_input``); no autocast.
ENGINE_CAST = "engine-cast"


@dataclass(frozen=True, kw_only=True)
class TraceSettings:
    """Everything that changes what the traced step allocates."""

    precision: str = "fp32"
    family: str = AUTOCAST
    cast_buffers: bool = False
    """PARAM_CAST only: cast floating buffers too (FSDP1 buffer_dtype; FSDP2 leaves them)."""
    optimizer: str = "adamw"
    activation_checkpointing: bool = False
    num_micro_batches: int = 1
    """1, or 2 when gradients accumulate (later micro-batches repeat the second)."""
    grad_accum: int = 1
    wrap: str | None = None
    tp: int = 1
    """Tensor-parallel degree: the step of one rank of a ``tp`` group (its DTensor shards)."""
    sequence_parallel: bool = False
    ep: int = 1
    """Expert-parallel degree: the step of one rank of an ``ep`` group (its experts, the routed
    tokens it receives under a balanced router)."""
    pp: int = 1
    """Pipeline ranks: the step of pipeline rank ``pp_rank`` (its stages, run by
    ``pp_schedule`` over ``grad_accum`` micro-batches; planner/trace/pipeline_rank.py)."""
    pp_schedule: str = "1f1b"
    pp_rank: int = 0
    cp: int = 1
    """Context-parallel degree: ``seq_len`` is then one rank's share, and attention adds ring
    attention's buffers (planner/context_parallel.py)."""
    seq_len: int | None = None
    """Tokens per sample of the example batch (None: the model file's own)."""
    device_type: str = "cpu"
    """Target device type: decides optimizer defaults (foreach on cuda)."""
    kernel_batch_size: int = 2
    """CPU target: the micro-batch at which the CPU kernels' in-op buffers are measured (the
    plan's; they are exact there and extrapolated linearly to others: planner/cpu_kernels.py)."""


@dataclass(frozen=True, kw_only=True)
class ParamInfo:
    name: str
    numel: int
    itemsize: int
    """Bytes per element of the parameter as traced."""
    shape: tuple[int, ...]
    unit: int
    """Index into StepTrace.unit_names; the last unit is the root."""
    storage: int
    """Storage index of the parameter itself."""
    grad_storage: int
    """Storage index of its gradient as created in the first micro-batch (-1: no gradient)."""
    holder_classes: tuple[str, ...] = ()
    """Class names of every module that holds it directly (more than one when it is tied)."""


@dataclass(frozen=True, kw_only=True)
class Marker:
    event: int
    """Index of the first event after the marker."""
    kind: str
    """fwd_start, fwd_end, bwd_start, bwd_end, recompute_start, grad, micro_batch, optimizer, end,
    root_bwd_start (the first gradient reaches the root module's outputs; index = root unit),
    root_fwd_end (the root module's forward has returned: where FSDP's root post-forward hook
    runs, before the loss function; index = root unit)"""
    index: int = -1
    """Unit index (fwd/bwd/recompute), parameter index (grad) or micro-batch index."""
    storage: int = -1
    """grad only: the storage autograd's AccumulateGrad summed into the parameter's existing
    ``.grad`` just before (``variable_grad += new_grad``: a later micro-batch's contribution),
    as the tracer saw the ``add_``; -1 when nothing was summed (the first micro-batch's grad)."""


@dataclass(frozen=True, kw_only=True)
class StepTrace:
    settings: TraceSettings
    trace_batch_size: int
    # Per event (N): which storage is born (+1) or dies (-1).
    event_storage: np.ndarray
    event_sign: np.ndarray
    # Per storage (S).
    storage_bytes: np.ndarray
    """Bytes at the trace batch size."""
    storage_batch_degree: np.ndarray
    storage_category: np.ndarray
    storage_module: np.ndarray
    """Index into module_names of the innermost module running at birth (-1: none)."""
    storage_owner: np.ndarray
    """Index into params of the parameter a storage belongs to (the parameter itself, its
    gradient, its optimizer state, or an optimizer-step temporary computed from them); -1 for
    activations and everything else."""
    num_baseline_events: int
    """Events before this index are storages alive when the step starts."""
    markers: list[Marker]
    params: list[ParamInfo]
    unit_names: list[str]
    module_names: list[str]
    module_classes: list[str]
    num_ops: int
    """Operations of the step (of the full model, also when it was built by repetition)."""
    checkpointing: str = "none"
    repeated_layers: int = 0
    """0: every layer was traced; else the number of alike layers in the stack that was traced
    at three and four layers and built to this depth (planner/trace/repeated_layers.py)."""
    expert_units: tuple[int, ...] = ()
    """Units that are experts modules (expert parallelism): FSDP2 shards each over the ranks that
    hold the same experts, not over every data-parallel rank."""
    pipeline_stages: tuple[int, ...] = ()
    """With pipeline parallelism: the stage indices the traced rank holds."""
    pipeline_owns: tuple[str, ...] = ()
    """... and what they hold (``embedding``, ``layers 0-2``, ``head``)."""
    notes: tuple[str, ...] = ()
    """What the trace assumed where it could not be exact (an op planned at an upper bound, a
    CPU kernel whose buffers could not be measured); shown with every estimate."""

    def storage_bytes_at(self, batch_size: int) -> np.ndarray:
        """Bytes of every storage at another micro-batch size (exact, see module docstring)."""
        scale = np.array([1.0, batch_size / self.trace_batch_size, (batch_size / self.trace_batch_size) ** 2])
        scaled = self.storage_bytes * scale[self.storage_batch_degree]
        return np.rint(scaled).astype(np.int64)

    def live_bytes(self, batch_size: int) -> np.ndarray:
        """Live bytes after each event (length N)."""
        sizes = self.storage_bytes_at(batch_size)
        return np.cumsum(self.event_sign * sizes[self.event_storage])

    def markers_of(self, kind: str) -> list[Marker]:
        return [m for m in self.markers if m.kind == kind]


def cached_on_trace(trace: StepTrace, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per trace and key: for what every strategy and rank planned from one
    trace derives from it alike. What it returns is shared, so read-only."""
    cache = trace.__dict__.setdefault("_derived", {})  # a frozen dataclass: set past __setattr__
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def batch_degree(nbytes: np.ndarray, prime: int) -> np.ndarray:
    degree = np.zeros(len(nbytes), dtype=np.int64)
    once = (nbytes % prime == 0) & (nbytes > 0)
    degree[once] = 1
    twice = once & (nbytes % (prime * prime) == 0)
    degree[twice] = 2
    return degree

