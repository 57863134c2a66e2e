"""The trace: one steady-state training step of the unwrapped model, run on the fake device
(planner/fake_device/), as the birth and death of every tensor storage plus markers.

What a trace is: step_trace.py (``StepTrace``, the storage categories, the precision families,
``TraceSettings``), and index.py (``TraceIndex``, its markers read once). How one is made:
full_or_built.py (``trace_step``: in full, or built from short copies of a deep stack by
repeated_layers.py, layer_stack.py, repetition_rule.py with layer_segments.py and
layer_storages.py, and checked with canonical_form.py);
steady_step.py traces one model with the recorder (recorder.py), the unit hooks
(unit_markers.py) and the precision families' casts (precision.py); errors.py tells the model's
failures from the tracer's.

What the rest of dpplan uses is importable from here.
"""

from dpplan.planner.trace.errors import TraceError, TracerBug
from dpplan.planner.trace.full_or_built import has_floating_buffers, has_floating_inputs, trace_step, untraced_model
from dpplan.planner.trace.index import MicroBatchSpan, TraceIndex, trace_index
from dpplan.planner.trace.step_trace import (
    ACTIVATION,
    AUTOCAST,
    BUFFER,
    CATEGORY_NAMES,
    ENGINE_CAST,
    GRADIENT,
    INPUT,
    OPTIMIZER_STATE,
    OPTIMIZER_TEMPORARY,
    OTHER,
    PARAM_CAST,
    PARAMETER,
    TEMPORARY,
    TRACE_BATCH_SIZE,
    Marker,
    ParamInfo,
    StepTrace,
    TraceSettings,
    cached_on_trace,
)

__all__ = [
    "ACTIVATION", "AUTOCAST", "BUFFER", "CATEGORY_NAMES", "ENGINE_CAST", "GRADIENT", "INPUT",
    "OPTIMIZER_STATE", "OPTIMIZER_TEMPORARY", "OTHER", "PARAM_CAST", "PARAMETER", "TEMPORARY",
    "TRACE_BATCH_SIZE", "Marker", "MicroBatchSpan", "ParamInfo", "StepTrace", "TraceError", "TraceIndex",
    "TraceSettings", "TracerBug", "cached_on_trace", "has_floating_buffers", "has_floating_inputs",
    "trace_index", "trace_step", "untraced_model",
]
