"""The fake device's tensor: a meta tensor that reports the target device type.

Why not plain meta tensors: on the meta device ``torch.autocast("cpu")`` casts nothing (autocast
only touches tensors of its device) and ``scaled_dot_product_attention`` falls back to the math
path that keeps the full S x S attention matrix, which neither CPU nor GPU fused attention keeps.
A tensor that *is* meta underneath but reports ``cpu`` gets the real autocast, the real SDPA
kernel choice and the real optimizer defaults of that device, while each op still runs only the
meta kernel: no data, no memory. This is the idea of torch's ``FakeTensorMode``, reduced to what
a memory trace needs. The tracer that runs ops on these tensors is storage_tracer.py beside it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpplan.errors import InternalError

CPU = torch.device("cpu")
META = torch.device("meta")
_Tensor = torch.Tensor
PRIM_DEVICE = torch.ops.prim.device.default


class FakeDeviceError(InternalError):
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

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]  # as torch's own subclasses

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is PRIM_DEVICE:
            return CPU
        if any(t is not cls and is_dtensor_type(t) for t in types):
            # what DTensor itself refuses on a real run (a model, or its plan, mixes them)
            raise RuntimeError(f"{func} got mixed torch.Tensor and DTensor inputs: the tensor-parallel plan splits "
                               "one input of this op and not the other")
        raise FakeDeviceError(f"{func} ran on a fake-device tensor outside dpplan's tracing mode")

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]  # torch's signature
        return f"FakeDeviceTensor(shape={tuple(self.shape)}, dtype={self.dtype})"

    def __format__(self, format_spec: str) -> str:
        # torch.Tensor formats a 0-d tensor as its item only for exact Tensors; models use
        # f"expert_{index}" with one (Hugging Face's MoE loops).
        if self.dim() == 0:
            return self.item().__format__(format_spec)
        return object.__format__(self, format_spec)


def to_meta(value: Any) -> Any:
    if type(value) is FakeDeviceTensor:
        return value.meta
    if isinstance(value, _Tensor) and value.device.type != "meta":
        # A real tensor created outside the trace (a global in the model file): a meta twin.
        return value.to(META)
    return value


def unwrap(values):
    out = []
    for value in values:
        if isinstance(value, _Tensor):
            out.append(to_meta(value))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, _Tensor) for v in value):
            # also lists that start with None: the indices of ``x[..., [i], :]``
            out.append(type(value)(to_meta(v) for v in value))
        else:
            out.append(value)
    return out


def meta_like(value: Any) -> Any:
    """Meta tensors with the shapes, strides and dtypes of real ones."""
    if isinstance(value, _Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=META)
    if isinstance(value, (list, tuple)):
        return type(value)(meta_like(v) for v in value)
    return value


class UntracedMode(TorchDispatchMode):
    """Runs ops on fake-device tensors without recording them: for torch's own helpers that look
    at tensors the way a kernel would (``_select_conv_backend``), not ops of the step."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is PRIM_DEVICE:
            return CPU
        result = func(*unwrap(args), **dict(zip(kwargs or {}, unwrap((kwargs or {}).values()))))
        if isinstance(result, _Tensor):
            return FakeDeviceTensor(result)
        if isinstance(result, (list, tuple)):
            return type(result)(FakeDeviceTensor(r) if isinstance(r, _Tensor) else r for r in result)
        return result


def is_dtensor(tensor: Any) -> bool:
    """A DTensor (a tensor-parallel plan's parameter or activation). Read without importing
    torch.distributed.tensor: a DTensor exists only once something has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_dtensor_type(cls: type) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and issubclass(cls, module.DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor that holds a rank's memory: a DTensor's local shard (tensor parallelism),
    else the tensor itself. Storages are counted on it."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def to_fake_device(tensor: torch.Tensor) -> torch.Tensor:
    """A fake-device tensor for a meta tensor (keeps ``requires_grad``); a DTensor (a tensor
    parallel plan's parameter) keeps its placements over a fake-device local shard."""
    if type(tensor) is FakeDeviceTensor:
        return tensor
    if is_dtensor(tensor):
        dtensor: Any = type(tensor)  # DTensor, imported by whoever made one
        local = to_fake_device(tensor._local_tensor.detach())  # type: ignore[attr-defined]
        return dtensor(local, tensor._spec, requires_grad=tensor.requires_grad)  # type: ignore[attr-defined]
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
            param_twin = twins.get(id(param))
            if param_twin is None:
                plain = param if is_dtensor(param) else param.detach()  # a DTensor is detached shard-wise
                param_twin = torch.nn.Parameter(to_fake_device(plain), requires_grad=param.requires_grad)
                twins[id(param)] = param_twin
            sub._parameters[name] = param_twin  # type: ignore[assignment]  # a Parameter, made above
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
