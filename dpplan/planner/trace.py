"""Trace one steady-state training step of the unwrapped model on the fake device.

The result, a ``StepTrace``, is the birth and death of every tensor storage in the step, in
order, with what each storage is (parameter, gradient, optimizer state, activation, ...),
plus markers: where each unit's forward and backward start and end, where each parameter's
gradient arrives, where the optimizer step runs. The strategies (planner/strategies.py) replay
this timeline with their own parameter, gradient and buffer lifecycles.

Batch size. The step is traced once, at ``TRACE_BATCH_SIZE``, a prime that no model dimension
is a multiple of in practice. A storage whose byte count is a multiple of that prime holds
one (or, for batch x batch tensors such as a contrastive loss, two) batch dimensions; its size
at any other batch size follows exactly. One trace thus answers every batch size, which is what
makes a search for the largest batch that fits cheap.
"""

from __future__ import annotations

import contextlib
import traceback
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dpplan.errors import InternalError, UsageError
from dpplan.planner import data_dependent, fake_device, torch_apis
from dpplan.planner.no_dynamo import dynamo_untouched
from dpplan.training.model_file import ModelFileError, ModelSpec, build_module, call_user, describe_user_exception
from dpplan.training.optimizers import build_optimizer
from dpplan.training.training_step import (
    LOW_PRECISION_DTYPE, autocast_context, cast_floating, run_micro_batch, run_optimizer_step,
)
from dpplan.training.units import checkpoint_units, find_units

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


class TraceError(UsageError):
    """The model could not be run on the fake device (one line for the user)."""


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
    at three and four layers and built to this depth (planner/repeated_layers.py)."""
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


class _Recorder:
    """Collects storage births and deaths and the markers while the step runs."""

    def __init__(self):
        self.recording = False
        self.event_storage: list[int] = []
        self.event_sign: list[int] = []
        self.storage_bytes: list[int] = []
        self.storage_category: list[int] = []
        self.storage_module: list[int] = []
        self.storage_owner: list[int] = []
        self.live: dict[int, int] = {}  # storage key -> storage index
        self.born_in_op: list[int] = []  # storage indices born in the running op
        self.markers: list[Marker] = []
        self.phase = OTHER
        self.module_stack: list[int] = [-1]

    def alloc(self, key: int, nbytes: int) -> None:
        index = len(self.storage_bytes)
        self.live[key] = index
        self.storage_bytes.append(nbytes)
        self.storage_category.append(self.phase)
        self.storage_module.append(self.module_stack[-1])
        self.storage_owner.append(-1)
        self.born_in_op.append(index)
        self.event_storage.append(index)
        self.event_sign.append(1)

    def free(self, key: int) -> None:
        index = self.live.pop(key, None)
        if index is None:
            return
        self.event_storage.append(index)
        self.event_sign.append(-1)

    def merge(self, new_key: int, old_key: int) -> bool:
        """Storage ``old_key`` dies now, and storage ``new_key`` (just born: the last event) holds
        a sum that the real run would have made in ``old_key``'s memory (a gradient summed in
        place, see ``StorageTracer._note_accumulation``): record the death before the birth, so
        that the two are never alive together. False (nothing changed) when the birth is not the
        last event, a marker follows it, or the sizes differ."""
        new_index, old_index = self.live.get(new_key), self.live.get(old_key)
        if new_index is None or old_index is None or self.storage_bytes[new_index] != self.storage_bytes[old_index]:
            return False
        position = len(self.event_storage) - 1
        if position < 0 or self.event_storage[position] != new_index or self.event_sign[position] != 1:
            return False
        if self.markers and self.markers[-1].event > position:
            return False
        del self.live[old_key]
        self.event_storage.insert(position, old_index)
        self.event_sign.insert(position, -1)
        return True

    def phase_boundary(self) -> None:
        """An empty storage born and freed: it separates markers that would otherwise share one
        position, so what a strategy inserts at the end of backward (FSDP's root
        post-backward) is told apart from what it inserts at the start of the optimizer step."""
        key = -1 - len(self.storage_bytes)  # no real storage has a negative key
        self.alloc(key, 0)
        self.storage_category[-1] = OTHER
        self.free(key)

    def mark(self, kind: str, index: int = -1) -> None:
        self.markers.append(Marker(event=len(self.event_storage), kind=kind, index=index))

    def storage_of(self, tensor: torch.Tensor) -> int:
        return self.live[tensor.untyped_storage()._cdata]

    def owner_of(self, tensor: Any) -> int:
        if not isinstance(tensor, torch.Tensor):
            return -1
        index = self.live.get(tensor.untyped_storage()._cdata)
        return -1 if index is None else self.storage_owner[index]

    def attribute_outputs(self, func, args, outputs) -> None:
        """Optimizer phase: a new storage belongs to the parameter its inputs belong to.

        foreach ops pair list outputs with list inputs element by element.
        """
        born, self.born_in_op = self.born_in_op, []
        if not born:
            return
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        if lists and isinstance(outputs, (list, tuple)):
            for j, out in enumerate(outputs):
                owner = -1
                for lst in lists:
                    if j < len(lst):
                        owner = self.owner_of(lst[j])
                        if owner >= 0:
                            break
                if isinstance(out, torch.Tensor):
                    index = self.live.get(out.untyped_storage()._cdata)
                    if index is not None and self.storage_owner[index] < 0:
                        self.storage_owner[index] = owner
            return
        owner = -1
        for arg in args:
            owner = self.owner_of(arg)
            if owner >= 0:
                break
        for index in born:
            if self.storage_owner[index] < 0:
                self.storage_owner[index] = owner


class TracerBug(InternalError):
    """The tracer itself failed (a dpplan bug, or a torch change under it): an internal error."""


_PACKAGE = str(Path(__file__).resolve().parent.parent)


def _raised_by_dpplan(exc: BaseException) -> bool:
    """Whether the innermost Python frame of the failure is dpplan's: an AttributeError or a
    TypeError of ours, or a private torch API that changed under a call of ours. Failures inside
    torch's kernels (a shape mismatch) and inside the model's code are the model's."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE) and not isinstance(
        exc, (RuntimeError, NotImplementedError)
    )


def _innermost(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} ({frame.line})"


def _describe_trace_failure(exc: BaseException, spec: ModelSpec) -> str:
    text = describe_user_exception(exc, spec.path)
    if "data-dependent" in str(exc) or "nonzero" in str(exc) or "_local_scalar_dense" in str(exc):
        text += " (the model uses an op whose output size depends on data, which cannot be planned without data)"
    return f"the model rejected its example batch: {text}"


def _prepare_precision(model: nn.Module, batch: Any, settings: TraceSettings) -> Any:
    """Cast the meta model (and its inputs) as the strategy family's real run would."""
    low = LOW_PRECISION_DTYPE.get(settings.precision)
    if settings.precision == "bf16":
        model.to(torch.bfloat16)
        return batch
    if settings.family == ENGINE_CAST and low is not None:
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(low)
        return cast_floating(batch, low)
    if settings.family == PARAM_CAST and low is not None and settings.precision != "bf16":
        # FSDP1 (the family that casts buffers) keeps BatchNorm in full precision, below
        full_precision = _batch_norms_in_full_precision(model) if settings.cast_buffers else set()
        kept = {id(t) for m in full_precision for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
        for param in model.parameters():
            if param.is_floating_point() and id(param) not in kept:
                param.data = param.data.to(low)
        if settings.cast_buffers:
            for sub in model.modules():
                for name, buf in sub._buffers.items():
                    if buf is not None and buf.is_floating_point() and id(buf) not in kept:
                        sub._buffers[name] = buf.to(low)
        _cast_root_inputs(model, low)
    return batch


def _batch_norms_in_full_precision(model: nn.Module) -> set[nn.Module]:
    """FSDP1's ``MixedPrecision._module_classes_to_ignore`` (default ``(_BatchNorm,)``): with an
    auto-wrap policy, as dpplan's runs wrap, each BatchNorm becomes an FSDP unit of its own with
    mixed precision off, and hooks cast its inputs to fp32 and its outputs back
    (torch/distributed/fsdp/_common_utils.py ``_override_module_mixed_precision``): its
    parameters and statistics stay fp32, and it keeps an fp32 copy of its input for backward."""
    from torch.nn.modules.batchnorm import _BatchNorm

    kept = {m for m in model.modules() if isinstance(m, _BatchNorm)}
    for module in kept:
        dtypes: dict[int, torch.dtype] = {}

        def to_fp32(module, args, dtypes=dtypes):
            def cast(x):
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32:
                    dtypes[0] = x.dtype
                    return x.to(torch.float32)
                return x
            return tuple(cast(a) for a in args)

        def back(module, args, output, dtypes=dtypes):
            if 0 in dtypes and isinstance(output, torch.Tensor) and output.is_floating_point():
                return output.to(dtypes[0])
            return output

        module.register_forward_pre_hook(to_fp32)
        module.register_forward_hook(back)
    return kept


def _cast_root_inputs(model: nn.Module, low: torch.dtype) -> None:
    """FSDP casts the floating inputs of the root forward to the parameter dtype, in a forward
    pre-hook (FSDP2 ``MixedPrecisionPolicy.cast_forward_inputs``, FSDP1
    ``cast_root_forward_inputs``; torch/distributed/fsdp/_fully_shard/_fsdp_state.py
    ``_pre_forward``): the cast copy is made at each forward, and the caller's full-precision
    batch stays alive beside it (an image batch: both copies count)."""

    def cast(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return cast_floating(args, low), cast_floating(kwargs, low)

    model.register_forward_pre_hook(cast, with_kwargs=True)


def _grad_scaler(settings: TraceSettings):
    if settings.precision == "fp16-mixed":
        scaler = torch.amp.GradScaler("cpu")
        if settings.family in (PARAM_CAST, ENGINE_CAST):
            _allow_fp16_gradients(scaler)
        return fake_device.always_stepping(scaler)
    return None


def _allow_fp16_gradients(grad_scaler) -> None:
    """PARAM_CAST traces fp16 parameters, whose fp16 gradients ``GradScaler.unscale_``
    refuses; FSDP's ShardedGradScaler unscales them (``allow_fp16=True``,
    torch/distributed/fsdp/sharded_grad_scaler.py ``unscale_``), so the trace does too."""
    unscale = grad_scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    grad_scaler._unscale_grads_ = unscale_allowing_fp16


def trace_step(spec: ModelSpec, settings: TraceSettings, *, batch_size: int = TRACE_BATCH_SIZE) -> StepTrace:
    """Trace one steady-state step of ``spec``'s model under ``settings``."""
    with dynamo_untouched():
        return _trace_step(spec, settings, batch_size)


_UNTRACED_MODELS: "weakref.WeakKeyDictionary[ModelSpec, nn.Module]" = weakref.WeakKeyDictionary()


def untraced_model(spec: ModelSpec) -> nn.Module:
    """The model of ``spec`` built on the meta device once per model file and only ever read
    and copied, never traced: the precision families' traces of one plan build it once."""
    model = _UNTRACED_MODELS.get(spec)
    if model is None:
        with dynamo_untouched(), torch.device("meta"), fake_device.skip_weight_init():
            model = build_module(spec)
        _UNTRACED_MODELS[spec] = model
    return model


def has_floating_buffers(spec: ModelSpec) -> bool:
    """Whether FSDP1's ``buffer_dtype`` has anything to cast: without floating buffers the
    FSDP1 and FSDP2 mixed-precision traces are the same trace."""
    return any(b.is_floating_point() for b in untraced_model(spec).buffers())


def has_floating_inputs(spec: ModelSpec) -> bool:
    """Whether the example batch holds floating tensors (images, audio): only then do DeepSpeed's
    cast of the inputs before the step and FSDP's cast at the root forward allocate differently,
    so that ENGINE_CAST and FSDP2's PARAM_CAST traces differ."""
    with torch.device("meta"), fake_device.skip_weight_init():
        batch = call_user(spec, "example_batch()", spec.example_batch, 1)
    return _holds_floating(batch)


def _holds_floating(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if isinstance(value, Mapping):
        return any(_holds_floating(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_floating(v) for v in value)
    return False


def _trace_step(spec: ModelSpec, settings: TraceSettings, batch_size: int) -> StepTrace:
    from dpplan.planner import repeated_layers

    # A deep model whose layers are all alike is traced at three and four layers and the
    # full depth built from those (planner/repeated_layers.py); anything else in full, on a
    # model of its own (a trace changes the model it runs).
    repeated = repeated_layers.trace_by_repeating(
        untraced_model(spec), settings.wrap,
        lambda short, units: trace_model(spec, short, settings, batch_size, units=units),
    )
    if repeated is not None:
        return repeated
    with torch.device("meta"), fake_device.skip_weight_init():
        model = build_module(spec)
    return trace_model(spec, model, settings, batch_size)


def trace_model(
    spec: ModelSpec, model: nn.Module, settings: TraceSettings, batch_size: int, *, units: list[nn.Module] | None = None
) -> StepTrace:
    """Trace one step of ``model`` (built on the meta device, not yet traced): ``spec``
    gives its example batch and loss; ``units``, when given, replaces the units that
    ``settings.wrap`` would pick."""
    torch_apis.check(settings.device_type)
    with torch.device("meta"), fake_device.skip_weight_init():
        batch = call_user(spec, "example_batch()", spec.example_batch, batch_size)
    if units is None:
        units = find_units(model, settings.wrap)
    recorder = _Recorder()
    checkpointing = "none"
    if settings.activation_checkpointing:
        checkpointing = checkpoint_units(model, units, observe=lambda u, fwd: _observe_recompute(recorder, u, fwd))
    batch = _prepare_precision(model, batch, settings)

    def location() -> str:
        module = recorder.module_stack[-1]
        return f"{module_names[module]} ({module_classes[module]})" if module >= 0 else ""

    tracer = fake_device.StorageTracer(
        lambda k, n: recorder.alloc(k, n), lambda k: recorder.free(k), target_device_type=settings.device_type,
        # CPU kernels' buffers are fitted to the batch where the trace batch is the prime that
        # marks batch dims; a step traced at a real batch has them measured at that batch.
        trace_batch_size=batch_size if batch_size == TRACE_BATCH_SIZE else 1,
        kernel_batch_size=settings.kernel_batch_size,
    )
    tracer.location = location
    tracer.on_merge = recorder.merge
    module_index: dict[int, int] = {}
    module_names: list[str] = []
    module_classes: list[str] = []
    for name, sub in model.named_modules():
        module_index[id(sub)] = len(module_names)
        module_names.append(name or "(root)")
        module_classes.append(type(sub).__name__)

    # The generator state checkpointing keeps is host memory: it counts on a CPU target only.
    rng_state = (
        fake_device.host_rng_state_as_traced_tensor()
        if settings.device_type == "cpu" and checkpointing != "none"
        else contextlib.nullcontext()
    )
    try:
        with tracer, rng_state:
            fake_device.module_to_fake_device(model)
            batch = fake_device.tree_to_fake_device(batch)
            optimizer = build_optimizer(settings.optimizer, model.parameters(), device_type=settings.device_type)
            scaler = _grad_scaler(settings)
            return _trace_steady_step(
                spec, model, units, batch, optimizer, scaler, settings, recorder, tracer,
                module_index, module_names, module_classes, checkpointing, batch_size,
            )
    except (ModelFileError, TraceError):
        raise
    except fake_device.FakeDeviceError:
        raise
    except data_dependent.UnboundedOp as exc:
        where = f" in module {exc.where}" if exc.where else ""
        location = describe_user_exception(exc, spec.path).split(": ", 1)[0]
        raise TraceError(
            f"cannot plan {exc.op}{where} ({location}): its output size depends on data, which does "
            "not exist while planning, and has no upper bound"
        ) from None
    except Exception as exc:
        if _raised_by_dpplan(exc):  # our code or a torch API under it, not the user's model
            raise TracerBug(
                f"{_innermost(exc)}: {type(exc).__name__}: {exc} (torch {torch.__version__}; the tracer is "
                f"tested with torch {', '.join(torch_apis.TESTED_TORCH)})"
            ) from exc
        raise TraceError(_describe_trace_failure(exc, spec)) from None


def _move_births_to_baseline(recorder: _Recorder, storages: set[int], num_baseline: int) -> int:
    """Make storages created during the traced step exist from its start.

    The step is traced once, from an optimizer without state: torch optimizers create their
    state lazily inside the first ``step()``, with the same temporaries as every later step.
    Moving the births of that state (and of the grad scaler's scale) to the baseline turns
    the first step into the steady-state step, at the price of one optimizer step less to
    trace. Returns the new number of baseline events.
    """
    events = range(num_baseline, len(recorder.event_storage))
    moved = [
        i for i in events if recorder.event_sign[i] > 0 and recorder.event_storage[i] in storages
    ]
    if not moved:
        return num_baseline
    moved_set = set(moved)
    order = list(range(num_baseline)) + moved + [i for i in events if i not in moved_set]
    recorder.event_storage = [recorder.event_storage[i] for i in order]
    recorder.event_sign = [recorder.event_sign[i] for i in order]
    removed_before = np.searchsorted(np.asarray(moved), np.arange(len(order) + 1), side="left")
    recorder.markers = [
        Marker(event=m.event + len(moved) - int(removed_before[m.event]), kind=m.kind, index=m.index)
        for m in recorder.markers
    ]
    return num_baseline + len(moved)


def _trace_steady_step(
    spec, model, units, batch, optimizer, scaler, settings, recorder, tracer,
    module_index, module_names, module_classes, checkpointing, batch_size,
) -> StepTrace:
    # -- what exists when the step starts ---------------------------------------------------
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    param_names: list[str] = []
    for name, param in model.named_parameters():
        if id(param) not in seen:
            seen.add(id(param))
            params.append(param)
            param_names.append(name)
    recorder.recording = True

    def adopt(tensor: torch.Tensor, category: int) -> None:
        key = tensor.untyped_storage()._cdata
        if key in recorder.live:
            return
        recorder.phase = category
        tracer.adopt(tensor)

    # Start a clean record: what is alive now is the baseline, labelled by what it is.
    recorder.__init__()
    recorder.recording = True
    for i, param in enumerate(params):
        adopt(param, PARAMETER)
        recorder.storage_owner[recorder.storage_of(param)] = i
    # A buffer is labelled with its module, so that a layer's buffers are known as its own.
    seen_buffers: set[int] = set()
    for sub in model.modules():
        for buf in sub._buffers.values():
            if buf is not None and id(buf) not in seen_buffers:
                seen_buffers.add(id(buf))
                adopt(buf, BUFFER)
                recorder.storage_module[recorder.storage_of(buf)] = module_index.get(id(sub), -1)
    for i, param in enumerate(params):
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor):
                adopt(value, OPTIMIZER_STATE)
                recorder.storage_owner[recorder.storage_of(value)] = i
    if scaler is not None:
        for value in vars(scaler).values():
            if isinstance(value, torch.Tensor):
                adopt(value, OPTIMIZER_STATE)
    for leaf in _tensors_in(batch):
        adopt(leaf, INPUT)
    num_baseline = len(recorder.event_storage)

    # -- markers ----------------------------------------------------------------------------
    unit_of_module = {id(u): i for i, u in enumerate(units)}
    root_unit = len(units)
    unit_names = [_qualified(module_names, module_index, u) for u in units] + ["(root)"]
    handles = []

    def on_forward_pre(module, args):
        recorder.module_stack.append(module_index.get(id(module), -1))

    def on_forward_post(module, args, output):
        if len(recorder.module_stack) > 1:
            recorder.module_stack.pop()

    handles.append(nn.modules.module.register_module_forward_pre_hook(on_forward_pre))
    handles.append(nn.modules.module.register_module_forward_hook(on_forward_post, always_call=True))

    for unit in units:
        u = unit_of_module[id(unit)]
        handles.append(unit.register_forward_pre_hook(_unit_pre_hook(recorder, u), with_kwargs=True))
        handles.append(unit.register_forward_hook(_unit_post_hook(recorder, u), with_kwargs=True))
    handles.append(model.register_forward_hook(_root_post_hook(recorder, root_unit), with_kwargs=True))

    param_index = {id(p): i for i, p in enumerate(params)}
    grad_storage = [-1] * len(params)

    def on_grad(param):
        i = param_index[id(param)]
        recorder.mark("grad", i)
        if grad_storage[i] < 0 and param.grad is not None:
            grad_storage[i] = recorder.storage_of(param.grad)

    for param in params:
        if param.requires_grad:
            handles.append(param.register_post_accumulate_grad_hook(on_grad))

    # -- the step ---------------------------------------------------------------------------
    try:
        for micro in range(settings.num_micro_batches):
            recorder.mark("micro_batch", micro)
            recorder.mark("fwd_start", root_unit)
            recorder.phase = ACTIVATION
            run_micro_batch(
                model, batch, spec.loss_fn,
                grad_accum=settings.grad_accum,
                autocast=autocast_context(settings.precision, "cpu", settings.family == AUTOCAST),
                grad_scaler=scaler,
                before_backward=lambda: _enter_backward(recorder),
            )
            recorder.mark("bwd_end", root_unit)
        recorder.phase_boundary()
        recorder.phase = OPTIMIZER_TEMPORARY
        recorder.mark("optimizer")
        for i, param in enumerate(params):
            if param.grad is not None:
                grad = recorder.storage_of(param.grad)
                recorder.storage_category[grad] = GRADIENT
                recorder.storage_owner[grad] = i
        recorder.born_in_op = []
        tracer.on_op_done = recorder.attribute_outputs
        run_optimizer_step(optimizer, scaler)
        tracer.on_op_done = None
        recorder.mark("end")
    finally:
        for handle in handles:
            handle.remove()

    # Optimizer state created in this step (lazily) is state, not temporary, and from the
    # second step on it exists before the step starts.
    persistent: set[int] = set()
    for i, param in enumerate(params):
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata in recorder.live:
                index = recorder.storage_of(value)
                recorder.storage_category[index] = OPTIMIZER_STATE
                recorder.storage_owner[index] = i
                persistent.add(index)
    if scaler is not None:
        for value in vars(scaler).values():
            if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata in recorder.live:
                index = recorder.storage_of(value)
                recorder.storage_category[index] = OPTIMIZER_STATE
                persistent.add(index)
    num_baseline = _move_births_to_baseline(recorder, persistent, num_baseline)
    for i, index in enumerate(grad_storage):
        if index >= 0:
            recorder.storage_category[index] = GRADIENT
            recorder.storage_owner[index] = i

    unit_of_param = _unit_of_params(model, units, params, root_unit)
    holders: dict[int, list[str]] = {}
    for sub in model.modules():
        for held in sub._parameters.values():
            if held is not None:
                holders.setdefault(id(held), []).append(type(sub).__name__)
    storage_bytes = np.asarray(recorder.storage_bytes, dtype=np.int64)
    param_infos = [
        ParamInfo(
            name=param_names[i],
            numel=p.numel(),
            itemsize=p.element_size(),
            shape=tuple(p.shape),
            unit=unit_of_param[i],
            storage=recorder.live.get(p.untyped_storage()._cdata, -1),
            grad_storage=grad_storage[i],
            holder_classes=tuple(holders.get(id(p), ())),
        )
        for i, p in enumerate(params)
    ]
    return StepTrace(
        settings=settings,
        trace_batch_size=batch_size,
        event_storage=np.asarray(recorder.event_storage, dtype=np.int64),
        event_sign=np.asarray(recorder.event_sign, dtype=np.int64),
        storage_bytes=storage_bytes,
        storage_batch_degree=batch_degree(storage_bytes, batch_size),
        storage_category=np.asarray(recorder.storage_category, dtype=np.int64),
        storage_module=np.asarray(recorder.storage_module, dtype=np.int64),
        storage_owner=np.asarray(recorder.storage_owner, dtype=np.int64),
        num_baseline_events=num_baseline,
        markers=recorder.markers,
        params=param_infos,
        unit_names=unit_names,
        module_names=module_names,
        module_classes=module_classes,
        num_ops=tracer.num_ops,
        checkpointing=checkpointing,
        notes=tuple(f"{note} ({count} calls)" if count > 1 else note for note, count in tracer.notes.items()),
    )


def _enter_backward(recorder: _Recorder) -> None:
    recorder.mark("backward")
    recorder.phase = TEMPORARY
    recorder.module_stack[:] = [-1]


def _qualified(module_names, module_index, module) -> str:
    return module_names[module_index[id(module)]]


def _observe_recompute(recorder: _Recorder, unit: int, forward):
    """Mark a checkpointed unit's forward when it runs again inside backward."""

    def observed(*args, **kwargs):
        if fake_device.current_graph_task_id() == -1:
            return forward(*args, **kwargs)
        recorder.mark("recompute_start", unit)
        try:
            return forward(*args, **kwargs)
        finally:
            recorder.mark("recompute_end", unit)

    return observed


def _unit_pre_hook(recorder: _Recorder, unit: int):
    def hook(module, args, kwargs):
        if fake_device.current_graph_task_id() != -1:
            return None  # a module's own recomputation (e.g. Hugging Face checkpointing)
        recorder.mark("fwd_start", unit)
        inputs = [t for t in _tensors_in((args, kwargs)) if t.requires_grad]
        if inputs:
            torch.autograd.graph.register_multi_grad_hook(
                inputs, lambda grads: recorder.mark("bwd_end", unit), mode="all"
            )
        return None

    return hook


def _unit_post_hook(recorder: _Recorder, unit: int):
    def hook(module, args, kwargs, output):
        if fake_device.current_graph_task_id() != -1:
            return None
        recorder.mark("fwd_end", unit)
        _mark_first_output_grad(recorder, output, "bwd_start", unit)
        return None

    return hook


def _mark_first_output_grad(recorder: _Recorder, output, kind: str, unit: int) -> None:
    """Mark ``kind`` when the first gradient reaches any of ``output``'s tensors."""
    outputs = [t for t in _tensors_in(output) if t.requires_grad]
    fired = []

    def on_output_grad(grad):
        if not fired:
            fired.append(True)
            recorder.mark(kind, unit)
        return None

    for tensor in outputs:
        tensor.register_hook(on_output_grad)


def _root_post_hook(recorder: _Recorder, root_unit: int):
    """Mark ``root_fwd_end`` where the root module's forward returns (FSDP's post-forward of
    the root), and ``root_bwd_start`` where the first gradient reaches its outputs: where
    FSDP's pre-backward hook of the root runs (a tensor hook on the root's forward outputs,
    torch/distributed/fsdp/_runtime_utils.py ``_register_pre_backward_hooks``)."""

    def hook(module, args, kwargs, output):
        if fake_device.current_graph_task_id() != -1:
            return None
        recorder.mark("root_fwd_end", root_unit)
        _mark_first_output_grad(recorder, output, "root_bwd_start", root_unit)
        return None

    return hook


def _unit_of_params(model, units, params, root_unit) -> list[int]:
    owner: dict[int, int] = {}
    for u, unit in enumerate(units):
        for p in unit.parameters():
            owner.setdefault(id(p), u)
    return [owner.get(id(p), root_unit) for p in params]


def _tensors_in(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and hasattr(item, "keys") and hasattr(item, "values"):
            stack.extend(item.values())
    return found
