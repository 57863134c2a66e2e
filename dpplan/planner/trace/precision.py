"""Precision preparation: the meta model, its inputs and the grad scaler cast as each precision
family's real run casts them (families: planner/trace/step_trace.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpplan.planner import fake_device
from dpplan.planner.fake_device.fake_tensor import is_dtensor
from dpplan.planner.trace.step_trace import ENGINE_CAST, PARAM_CAST, TraceSettings
from dpplan.training.training_step import LOW_PRECISION_DTYPE, cast_floating


def prepare_precision(model: nn.Module, batch: Any, settings: TraceSettings) -> Any:
    """Cast the meta model (and its inputs) as the strategy family's real run would."""
    low = LOW_PRECISION_DTYPE.get(settings.precision)
    if settings.precision == "bf16":
        model.to(torch.bfloat16)
        return batch
    if settings.family == ENGINE_CAST and low is not None:
        for param in model.parameters():
            if param.is_floating_point():
                _cast_parameter(param, low)
        return cast_floating(batch, low)
    if settings.family == PARAM_CAST and low is not None and settings.precision != "bf16":
        # FSDP1 (the family that casts buffers) keeps BatchNorm in full precision, below
        full_precision = _batch_norms_in_full_precision(model) if settings.cast_buffers else set()
        kept = {id(t) for m in full_precision for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
        for param in model.parameters():
            if param.is_floating_point() and id(param) not in kept:
                _cast_parameter(param, low)
        if settings.cast_buffers:
            for sub in model.modules():
                for name, buf in sub._buffers.items():
                    if buf is not None and buf.is_floating_point() and id(buf) not in kept:
                        sub._buffers[name] = buf.to(low)
        _cast_root_inputs(model, low)
    return batch


def _cast_parameter(param: nn.Parameter, low: torch.dtype) -> None:
    """``param`` in ``low``, in place: ``.data`` for a plain parameter; a DTensor (tensor
    parallelism) keeps its local shard in an attribute that ``.data`` does not reach, so its
    contents are swapped for a cast copy's."""
    if is_dtensor(param):
        torch.utils.swap_tensors(param, nn.Parameter(param.detach().to(low), requires_grad=param.requires_grad))
    else:
        param.data = param.data.to(low)


def _batch_norms_in_full_precision(model: nn.Module) -> set[nn.Module]:
    """FSDP1's ``MixedPrecision._module_classes_to_ignore`` (default ``(_BatchNorm,)``): with an
    auto-wrap policy, as dpplan's runs wrap, each BatchNorm becomes an FSDP unit of its own with
    mixed precision off, and hooks cast its inputs to fp32 and its outputs back
    (torch/distributed/fsdp/_common_utils.py ``_override_module_mixed_precision``): its
    parameters and statistics stay fp32, and it keeps an fp32 copy of its input for backward."""
    from torch.nn.modules.batchnorm import _BatchNorm

    kept: set[nn.Module] = {m for m in model.modules() if isinstance(m, _BatchNorm)}
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


def grad_scaler(settings: TraceSettings):
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
