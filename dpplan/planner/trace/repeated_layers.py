"""Trace a deep stack of identical layers at three and four layers, and build the full depth.

A 70B transformer is 80 copies of one layer. Tracing all 80 costs seconds per precision
family; tracing a copy of the model cut to 3 layers and to 4 costs a tenth of that. The full
trace follows from the 3-layer one by a repetition rule (planner/trace/repetition_rule.py).

The rule is not trusted on its word: the 4-layer model is traced too, and the rule applied to
the 3-layer trace must give it exactly (same events, sizes, kinds, owners, markers, up to the
numbering of storages and the order of frees that happen together). Otherwise, or when the
layers are not alike, the model is traced in full. A model that treats its layers
differently (by index, by depth, or sharing tensors between them) therefore costs time, never
accuracy.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import replace

from torch import nn

from dpplan.planner.trace.canonical_form import canonical_form
from dpplan.planner.trace.layer_stack import (
    LayerStack,
    find_layer_stack,
    list_in,
    module_names_of,
    param_names_of,
    short_copy,
)
from dpplan.planner.trace.repetition_rule import SHORT_DEPTH, NotRepeatable, extend
from dpplan.planner.trace.step_trace import StepTrace

MIN_LAYERS = 8
"""Fewer layers are traced in full: the two short traces together hold seven layers."""


def trace_by_repeating(
    model: nn.Module, wrap: str | None, trace_model: Callable[[nn.Module, list[nn.Module]], StepTrace]
) -> StepTrace | None:
    """The full-depth trace of ``model`` built from short copies of it, or None when the model
    is not a stack of alike layers or the short traces do not follow the rule (trace in full).
    ``trace_model(short_model, units)`` traces a short copy with the given units."""
    stack = _layer_stack_of(model, wrap)
    if stack is None or len(stack.layers) < MIN_LAYERS:
        return None
    try:
        short = [short_copy(model, stack, depth) for depth in (SHORT_DEPTH, SHORT_DEPTH + 1)]
    except Exception:  # a model that cannot be copied is traced in full
        return None
    traces = []
    for depth, copy_ in zip((SHORT_DEPTH, SHORT_DEPTH + 1), short):
        try:
            traces.append(trace_model(copy_, list(list_in(copy_, stack))))
        except Exception:  # the full trace reports the model's own error, if it has one
            return None
        if traces[-1].unit_names != [stack.prefix + str(i) for i in range(depth)] + ["(root)"]:
            return None
    three, four = traces
    try:
        built_four = extend(three, stack, SHORT_DEPTH + 1, four.module_names, four.module_classes,
                            [p.name for p in four.params])
        if canonical_form(built_four) != canonical_form(four):
            _why("the rule does not reproduce the four-layer trace", built_four, four)
            return None
        names = module_names_of(model)
        full = extend(three, stack, len(stack.layers), names[0], names[1], param_names_of(model))
    except NotRepeatable as exc:
        _why(str(exc))
        return None
    per_layer_ops = four.num_ops - three.num_ops
    return replace(
        full,
        num_ops=three.num_ops + per_layer_ops * (len(stack.layers) - SHORT_DEPTH),
        repeated_layers=len(stack.layers),
    )


_STACKS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _layer_stack_of(model: nn.Module, wrap: str | None) -> LayerStack | None:
    """``find_layer_stack``, once per untraced model and wrap class (each precision family
    asks again)."""
    per_wrap = _STACKS.setdefault(model, {})
    if wrap not in per_wrap:
        per_wrap[wrap] = find_layer_stack(model, wrap)
    return per_wrap[wrap]


last_reason: list = []


def _why(reason: str, *traces) -> None:
    """Why the last model was traced in full (for tests and debugging)."""
    last_reason[:] = [reason, *traces]
