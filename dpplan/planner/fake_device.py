"""Run a model on a fake device: meta tensors that report the target device type.

This module holds every private torch API dpplan relies on; tests/planner/test_fake_device.py
fails loudly if a torch release changes one of them.

Why not plain meta tensors: on the meta device ``torch.autocast("cpu")`` casts nothing
(autocast only touches tensors of its device) and ``scaled_dot_product_attention`` falls back
to the math path that keeps the full S x S attention matrix, which neither CPU nor GPU fused
attention keeps. A tensor that *is* meta underneath but reports ``cpu`` gets the real
autocast, the real SDPA kernel choice and the real optimizer defaults of that device, while
each op still runs only the meta kernel: no data, no memory. This is the idea of torch's
``FakeTensorMode``, reduced to what a memory trace needs, which makes it about twice as fast.

Private APIs used:
  - ``torch.Tensor._make_subclass(..., dispatch_device=True, device_for_backend_keys=...)``
    (a subclass whose backend keys are those of the reported device),
  - ``torch.ops.prim.device`` (how C++ asks such a subclass for its device),
  - ``torch.utils._python_dispatch.TorchDispatchMode`` (intercepts every aten op),
  - ``UntypedStorage._cdata`` (a storage's identity) and weak references to storages (their
    Python objects live exactly as long as the storage, so a callback marks the free).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CPU = torch.device("cpu")
META = torch.device("meta")
_Tensor = torch.Tensor
_PRIM_DEVICE = torch.ops.prim.device.default
_LOCAL_SCALAR_DENSE = torch.ops.aten._local_scalar_dense.default


class FakeDeviceError(RuntimeError):
    """An op reached a fake-device tensor outside the tracing mode (a dpplan bug)."""


class FakeDeviceTensor(torch.Tensor):
    """A meta tensor that reports device ``cpu``. ``.meta`` is the meta tensor it stands for."""

    meta: torch.Tensor

    @staticmethod
    def __new__(cls, meta: torch.Tensor):
        tensor = _Tensor._make_subclass(
            cls, meta, meta.requires_grad, dispatch_device=True, device_for_backend_keys=CPU
        )
        tensor.meta = meta
        return tensor

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is _PRIM_DEVICE:
            return CPU
        raise FakeDeviceError(f"{func} ran on a fake-device tensor outside dpplan's tracing mode")

    def __repr__(self) -> str:
        return f"FakeDeviceTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


def _to_meta(value: Any) -> Any:
    if type(value) is FakeDeviceTensor:
        return value.meta
    if isinstance(value, _Tensor) and value.device.type != "meta":
        # A real tensor created outside the trace (a global in the model file): a meta twin.
        return value.to(META)
    return value


def _unwrap(values):
    out = []
    for value in values:
        if isinstance(value, _Tensor):
            out.append(_to_meta(value))
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], _Tensor):
            out.append(type(value)(_to_meta(v) for v in value))
        else:
            out.append(value)
    return out


def _is_real_device(device: Any) -> bool:
    return device is not None and torch.device(device).type != "meta"


class StorageTracer(TorchDispatchMode):
    """Runs every op on meta tensors and reports storage births and deaths.

    ``on_alloc(key, nbytes)`` is called for each new storage an op creates, ``on_free(key)``
    when that storage dies (all tensors viewing it gone). Storages that exist before the
    tracer starts are announced with ``adopt``.
    """

    def __init__(
        self,
        on_alloc: Callable[[int, int], None],
        on_free: Callable[[int], None],
        on_op_done: Callable[[Any, tuple, Any], None] | None = None,
    ):
        super().__init__()
        self.on_op_done = on_op_done
        """Called as ``on_op_done(func, args, outputs)`` after each op, when set."""
        self._on_alloc = on_alloc
        self._on_free = on_free
        self._alive: dict[int, weakref.ref] = {}
        self._returns_self: dict[Any, bool] = {}
        self.num_ops = 0
        self.current_op: Any = None
        """The aten op running now (for attributing a storage to the op that made it)."""

    # -- storages -------------------------------------------------------------------------
    def adopt(self, tensor: torch.Tensor) -> None:
        """Announce the storage of an existing tensor with ``on_alloc`` and track its death."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._alive:
            self._alive[key] = weakref.ref(storage, lambda _ref, key=key: self._died(key))
        self._on_alloc(key, storage.nbytes())

    def _died(self, key: int) -> None:
        if self._alive.pop(key, None) is not None:
            self._on_free(key)

    def is_alive(self, key: int) -> bool:
        return key in self._alive

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, _Tensor) and type(value) is not FakeDeviceTensor:
            storage = value.untyped_storage()
            key = storage._cdata
            if key not in self._alive:
                self._alive[key] = weakref.ref(storage, lambda _ref, key=key: self._died(key))
                self._on_alloc(key, storage.nbytes())
            return FakeDeviceTensor(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._wrap(v) for v in value)
        return value

    # -- ops ------------------------------------------------------------------------------
    def _mutates_and_returns_self(self, func) -> bool:
        known = self._returns_self.get(func)
        if known is None:
            schema = func._schema
            returns = schema.returns
            known = (
                len(returns) == 1
                and returns[0].alias_info is not None
                and returns[0].alias_info.is_write
            )
            self._returns_self[func] = known
        return known

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _PRIM_DEVICE:
            return CPU
        if func is _LOCAL_SCALAR_DENSE:
            # ``.item()``: there is no data. Optimizers read their step count this way
            # (1 keeps bias corrections finite); other data-dependent control flow in a model
            # cannot be planned without data anyway.
            return _placeholder_scalar(args[0].dtype)
        self.num_ops += 1
        self.current_op = func
        kwargs = kwargs or {}
        if kwargs:
            if _is_real_device(kwargs.get("device")):
                kwargs = {**kwargs, "device": META}
            if "out" in kwargs:
                raise FakeDeviceError(f"out= variants are not traced: {func}")
            kwargs = dict(zip(kwargs, _unwrap(kwargs.values())))
        result = func(*_unwrap(args), **kwargs)
        if self._mutates_and_returns_self(func):
            return args[0]
        wrapped = self._wrap(result)
        if self.on_op_done is not None:
            self.on_op_done(func, args, wrapped)
        return wrapped


def _placeholder_scalar(dtype: torch.dtype):
    if dtype == torch.bool:
        return False
    if dtype.is_floating_point or dtype.is_complex:
        return 1.0
    return 1


def always_stepping(grad_scaler):
    """A GradScaler that steps the optimizer without reading ``found_inf``.

    On the fake device ``found_inf`` has no value; a real fp16 run steps on all but the rare
    overflowing iterations, and those are what the plan is about. ``_maybe_opt_step`` is the
    private hook of ``torch.amp.GradScaler`` that makes that decision.
    """

    def step_unconditionally(optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)

    grad_scaler._maybe_opt_step = step_unconditionally
    return grad_scaler


def to_fake_device(tensor: torch.Tensor) -> torch.Tensor:
    """A fake-device tensor for a meta tensor (keeps ``requires_grad``)."""
    if type(tensor) is FakeDeviceTensor:
        return tensor
    if tensor.device.type != "meta":
        tensor = tensor.to(META)
    return FakeDeviceTensor(tensor)


def module_to_fake_device(module: torch.nn.Module) -> None:
    """Replace every meta parameter and buffer by a fake-device twin, keeping tied ones tied.

    Must run inside a ``StorageTracer`` (``nn.Parameter`` runs ``detach`` on its data).
    """
    twins: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            twin = twins.get(id(param))
            if twin is None:
                twin = torch.nn.Parameter(to_fake_device(param.detach()), requires_grad=param.requires_grad)
                twins[id(param)] = twin
            sub._parameters[name] = twin
        for name, buffer in list(sub._buffers.items()):
            if buffer is None:
                continue
            twin = twins.get(id(buffer))
            if twin is None:
                twin = to_fake_device(buffer)
                twins[id(buffer)] = twin
            sub._buffers[name] = twin


def tree_to_fake_device(value: Any) -> Any:
    """The batch (dict / tuple / list / tensor, nested) with every tensor on the fake device."""
    if isinstance(value, _Tensor):
        return to_fake_device(value)
    if isinstance(value, dict):
        return type(value)((k, tree_to_fake_device(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(tree_to_fake_device(v) for v in value)
    return value


@contextlib.contextmanager
def skip_weight_init():
    """Turn ``torch.nn.init``'s in-place initialisers into no-ops while a meta model is built.

    On the meta device they compute nothing but still cost about a second for a 70B model.
    """
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {name: getattr(init, name) for name in names}

    def keep(tensor, *args, **kwargs):
        return tensor

    for name in names:
        setattr(init, name, keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def current_graph_task_id() -> int:
    """-1 outside backward; used to tell a recomputed forward (checkpointing) from a real one."""
    return torch._C._current_graph_task_id()
