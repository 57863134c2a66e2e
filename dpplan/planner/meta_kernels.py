"""Where a meta kernel differs from the target device's kernels, the tracer decides as the device.

A meta kernel is written to mirror one device's checks and leaves out what only the device
decides. Where that changes what a training step allocates (an output's dtype, its memory
format, an op with no meta kernel at all), the tracer's planner/fake_device/storage_tracer.py calls
``run_meta_kernel`` instead of the meta kernel, and these rules decide as the device does.
"""

from __future__ import annotations

from typing import Any

import torch

from dpplan.planner.fake_device.fake_tensor import UntracedMode, to_meta

_Tensor = torch.Tensor
# A meta kernel is written to mirror one device's checks and leaves out what only the device
# decides. Where that changes what a step allocates, the tracer decides as the device does.


def run_meta_kernel(func, args: tuple, meta_args: list, kwargs: dict) -> Any:
    """The op's outputs on the meta device, as the target's kernels would return them.
    ``args`` report the target device, ``meta_args`` are the meta tensors behind them."""
    if func in _BF16_ONLY_META:
        return _grouped_mm_any_dtype(func, meta_args, kwargs)
    if func in _NO_META_KERNEL:
        return _NO_META_KERNEL[func](*meta_args, **kwargs)
    result = func(*meta_args, **kwargs)
    if func in _CONVOLUTIONS:
        result = _convolution_memory_format(func, args, result)
    elif func in _CONTIGUOUS_GRADIENTS:
        first = result[0] if isinstance(result, (tuple, list)) else result
        if isinstance(first, _Tensor) and not first.is_contiguous():
            first = first.contiguous()
            result = (first, *result[1:]) if isinstance(result, (tuple, list)) else first
    return result


# Backward kernels that allocate the input's gradient contiguous whatever the input's strides,
# where the meta kernel keeps them: a later ``reshape`` is then a view on the device, not a copy
# (Swin's final layer norm, a CTC head's log-softmax):
#   - ``native_layer_norm_backward``: aten/src/ATen/native/layer_norm.cpp ``layer_norm_backward_cpu``
#     and cuda/layer_norm_kernel.cu, ``at::native::empty_like(*X, ..., LEGACY_CONTIGUOUS_MEMORY_FORMAT)``;
#   - ``_softmax_backward_data``, ``_log_softmax_backward_data``: aten/src/ATen/native/SoftMax.cpp,
#     the structured kernels' ``set_output_raw_strided(0, input.sizes(), {}, ...)`` (no strides:
#     contiguous).
_CONTIGUOUS_GRADIENTS = frozenset({
    torch.ops.aten.native_layer_norm_backward.default,
    torch.ops.aten._softmax_backward_data.default,
    torch.ops.aten._log_softmax_backward_data.default,
})


# Ops without any meta kernel, whose outputs are shaped like an input:
#   - ``_ctc_loss_backward``: the gradient of ``log_probs``, contiguous (LossCTC.cpp
#     ``ctc_loss_backward_cpu_template``: ``at::full_like(log_probs, neginf,
#     LEGACY_CONTIGUOUS_MEMORY_FORMAT)``).
def _ctc_loss_backward(grad, log_probs, *rest, **kwargs):
    return torch.empty_like(log_probs, memory_format=torch.contiguous_format)


_NO_META_KERNEL = {
    torch.ops.aten._ctc_loss_backward.Tensor: _ctc_loss_backward,
    torch.ops.aten._ctc_loss_backward.default: _ctc_loss_backward,
}


# ``_grouped_mm`` (MoE experts: transformers' integrations/moe.py calls it on CPU and CUDA for
# any dtype): torch/_meta_registrations.py ``_meta_grouped_mm_common`` demands bf16, as the
# first CUDA kernel did; the CPU kernel and the CUDA fallback of torch 2.10+ take fp32 and fp16
# too and return ``out_dtype or mat_a.dtype``. Planned from the meta kernel run on bf16
# stand-ins, its output in the real dtype.
_BF16_ONLY_META = frozenset({torch.ops.aten._grouped_mm.default})


def _grouped_mm_any_dtype(func, meta_args: list, kwargs: dict) -> Any:
    floating = [a for a in meta_args if isinstance(a, _Tensor) and a.is_floating_point()]
    if all(a.dtype == torch.bfloat16 for a in floating):
        return func(*meta_args, **kwargs)
    positional_out_dtype = meta_args[4] if len(meta_args) > 4 else None
    out_dtype = kwargs.get("out_dtype") or positional_out_dtype or floating[0].dtype
    stand_ins = [a.to(torch.bfloat16) if isinstance(a, _Tensor) and a.is_floating_point() else a for a in meta_args]
    kwargs = {k: v for k, v in kwargs.items() if k != "out_dtype"}
    return func(*stand_ins[:4], **kwargs).to(out_dtype)


# Convolutions: the meta kernel returns contiguous outputs ("meta tensors have no device info,
# so _select_conv_backend returns Overrideable", torch/_meta_registrations.py ``meta_conv``);
# the device kernels return channels-last outputs for channels-last inputs (oneDNN, cuDNN),
# which changes what later permutes and ``contiguous()`` copy (ConvNeXt). The layout is chosen
# as torch's FakeTensor does (torch/_subclasses/fake_impls.py ``conv``): the backend torch would
# select for tensors of the target device, then its memory format.
_CONVOLUTIONS = frozenset({torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default})


def _convolution_memory_format(func, args: tuple, result: Any) -> Any:
    input_, weight = (args[0], args[1]) if func is torch.ops.aten.convolution.default else (args[1], args[2])
    stride, padding, dilation, transposed, output_padding, groups = (
        args[3:9] if func is torch.ops.aten.convolution.default else args[4:10]
    )
    with UntracedMode():  # the backend choice runs ops (1-d: a contiguous copy) of its own
        backend = torch._C._select_conv_backend(
            input_, weight, None, stride, padding, dilation, transposed, output_padding, groups, None
        )
    input_, weight = to_meta(input_), to_meta(weight)  # outside the mode: nothing here is traced
    if weight.dim() == 3:  # 1-d: decided on the 2-d view, as Convolution.cpp does
        input_, weight = input_.contiguous().unsqueeze(2), weight.unsqueeze(2)
    memory_format = torch._C._conv_determine_backend_memory_format(input_, weight, backend)
    if memory_format == torch.contiguous_format:
        return result

    def convert(tensor):
        if tensor is None:
            return None
        if tensor.dim() == 3 and memory_format == torch.channels_last:
            return tensor.unsqueeze(2).to(memory_format=memory_format).squeeze(2)
        return tensor.to(memory_format=memory_format)

    if func is torch.ops.aten.convolution.default:
        return convert(result)
    return convert(result[0]), convert(result[1]), result[2]
