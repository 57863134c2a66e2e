"""The hooks that mark where each unit's forward and backward start and end, where the root's
forward returns and its backward starts, and where a checkpointed unit's forward runs again,
in the recorder's markers (kinds: planner/trace/step_trace.py ``Marker``)."""

from __future__ import annotations

import torch
from torch import nn

from dpplan.planner import fake_device
from dpplan.planner.trace.recorder import Recorder, tensors_in
from dpplan.planner.trace.step_trace import TEMPORARY


def mark_units(
    recorder: Recorder, model: nn.Module, units: list[nn.Module], module_index: dict[int, int], *,
    pipeline: bool = False,
) -> list:
    """Register the hooks on ``model`` and its ``units`` (the root is unit ``len(units)``) and
    track the running module; returns their handles. ``pipeline``: a pipeline stage's, whose
    backward may be split (the zero-bubble schedules take input gradients with
    ``torch.autograd.grad`` first, weight gradients later): a unit's backward end is marked by
    its non-leaf inputs only (torch refuses a multi-grad hook on a leaf there: autograd/graph.py
    ``_will_engine_execute_node``) and by the first of their gradients ("any"): an "all" hook
    holds every gradient that arrived until the last does, which under a split backward keeps
    them past the weight step (measured: 1 MiB per micro-batch on the bundled GPT's stage)."""
    unit_of_module = {id(u): i for i, u in enumerate(units)}
    root_unit = len(units)
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
        handles.append(unit.register_forward_pre_hook(_unit_pre_hook(recorder, u, pipeline), with_kwargs=True))
        handles.append(unit.register_forward_hook(_unit_post_hook(recorder, u), with_kwargs=True))
    handles.append(model.register_forward_hook(_root_post_hook(recorder, root_unit), with_kwargs=True))
    return handles


def enter_backward(recorder: Recorder) -> None:
    recorder.mark("backward")
    recorder.phase = TEMPORARY
    recorder.module_stack[:] = [-1]


def observe_recompute(recorder: Recorder, unit: int, forward):
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


def _unit_pre_hook(recorder: Recorder, unit: int, pipeline: bool = False):
    def hook(module, args, kwargs):
        if fake_device.current_graph_task_id() != -1:
            return None  # a module's own recomputation (e.g. Hugging Face checkpointing)
        recorder.mark("fwd_start", unit)
        inputs = [t for t in tensors_in((args, kwargs)) if t.requires_grad and (not pipeline or t.grad_fn is not None)]
        if inputs:
            torch.autograd.graph.register_multi_grad_hook(
                inputs, lambda grads: recorder.mark("bwd_end", unit), mode="any" if pipeline else "all"
            )
        return None

    return hook


def _unit_post_hook(recorder: Recorder, unit: int):
    def hook(module, args, kwargs, output):
        if fake_device.current_graph_task_id() != -1:
            return None
        recorder.mark("fwd_end", unit)
        _mark_first_output_grad(recorder, output, "bwd_start", unit)
        return None

    return hook


def _mark_first_output_grad(recorder: Recorder, output, kind: str, unit: int) -> None:
    """Mark ``kind`` when the first gradient reaches any of ``output``'s tensors."""
    outputs = [t for t in tensors_in(output) if t.requires_grad]
    fired: list[bool] = []

    def on_output_grad(grad):
        if not fired:
            fired.append(True)
            recorder.mark(kind, unit)
        return None

    for tensor in outputs:
        tensor.register_hook(on_output_grad)


def _root_post_hook(recorder: Recorder, root_unit: int):
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
