"""The tracer's entry point: ``trace_step`` traces a model's step in full, or, for a deep stack
of alike layers, at three and four layers and builds the full depth (planner/trace/
repeated_layers.py); and what the estimate asks of a model before it decides which precision
traces it needs."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dpplan.planner import fake_device
from dpplan.planner.no_dynamo import dynamo_untouched
from dpplan.planner.trace import repeated_layers
from dpplan.planner.trace.steady_step import trace_model
from dpplan.planner.trace.step_trace import TRACE_BATCH_SIZE, StepTrace, TraceSettings
from dpplan.training.model_file import ModelSpec, build_module, call_user


def trace_step(spec: ModelSpec, settings: TraceSettings, *, batch_size: int = TRACE_BATCH_SIZE) -> StepTrace:
    """Trace one steady-state step of ``spec``'s model under ``settings``."""
    with dynamo_untouched():
        return _trace_step(spec, settings, batch_size)


_UNTRACED_MODELS: weakref.WeakKeyDictionary[ModelSpec, nn.Module] = weakref.WeakKeyDictionary()


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
    # A deep model whose layers are all alike is traced at three and four layers and the
    # full depth built from those (planner/trace/repeated_layers.py); anything else in full, on a
    # model of its own (a trace changes the model it runs).
    # (not under expert parallelism: its experts units nest in the layers, which the rule's
    # one-unit-per-layer check would refuse after two short traces; not for a pipeline rank,
    # whose layers are the model's split into stages)
    repeated = None if settings.ep > 1 or settings.pp > 1 else repeated_layers.trace_by_repeating(
        untraced_model(spec), settings.wrap,
        lambda short, units: trace_model(spec, short, settings, batch_size, units=units),
    )
    if repeated is not None:
        return repeated
    with torch.device("meta"), fake_device.skip_weight_init():
        model = build_module(spec)
    return trace_model(spec, model, settings, batch_size)
