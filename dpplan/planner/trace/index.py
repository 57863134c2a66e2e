"""The trace's markers read once: ``trace_index(trace)`` says where each micro-batch starts and
where its forward, backward, units and gradients are, where the optimizer step runs and the
step ends, and which traced storages were a later micro-batch's gradient contributions. Every
strategy and rank planned from one trace reads the same index (it is shared: read-only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dpplan.planner.trace.step_trace import Marker, StepTrace, cached_on_trace

UNIT_SPANS = ("fwd_start", "fwd_end", "bwd_start", "bwd_end", "recompute_start")
"""Unit markers whose first position per unit a micro-batch span keeps."""


@dataclass(kw_only=True)
class MicroBatchSpan:
    """Marker positions of one traced micro-batch."""

    start: int
    first_grad: int = -1
    backward_end: int = -1
    grad_position: dict[int, int] = field(default_factory=dict)
    fwd_start: dict[int, int] = field(default_factory=dict)
    fwd_end: dict[int, int] = field(default_factory=dict)
    bwd_start: dict[int, int] = field(default_factory=dict)
    bwd_end: dict[int, int] = field(default_factory=dict)
    recompute_start: dict[int, int] = field(default_factory=dict)
    markers: list[Marker] = field(default_factory=list)
    """Its markers in order, from its micro_batch marker on (the optimizer's excluded)."""


@dataclass(frozen=True, kw_only=True)
class TraceIndex:
    micro_batches: list[MicroBatchSpan]
    backward_starts: list[int]
    """Where each micro-batch's backward starts (the loss's ``backward()`` is called)."""
    root_backward_ends: list[int]
    """Where each micro-batch's backward ends (the root unit's bwd_end marker)."""
    optimizer: int
    """Where the optimizer step starts (the number of events if the trace has none)."""
    end: int
    """Where the step ends (the number of events if the trace has none)."""
    gradient_contributions: dict[tuple[int, int], list[int]]
    """(micro-batch, parameter) -> the traced storages that micro-batch's backward produced as
    the parameter's gradient (see ``_gradient_contributions``)."""

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)


def trace_index(trace: StepTrace) -> TraceIndex:
    """The index of ``trace``, computed once per trace."""
    return cached_on_trace(trace, "trace index", lambda: _index(trace))


def _index(trace: StepTrace) -> TraceIndex:
    num_events = len(trace.event_storage)
    return TraceIndex(
        micro_batches=_micro_batch_spans(trace),
        backward_starts=[m.event for m in trace.markers if m.kind == "backward"],
        root_backward_ends=[m.event for m in trace.markers if m.kind == "bwd_end" and m.index == _root(trace)],
        optimizer=next((m.event for m in trace.markers if m.kind == "optimizer"), num_events),
        end=next((m.event for m in trace.markers if m.kind == "end"), num_events),
        gradient_contributions=_gradient_contributions(trace),
    )


def _root(trace: StepTrace) -> int:
    return len(trace.unit_names) - 1


def _micro_batch_spans(trace: StepTrace) -> list[MicroBatchSpan]:
    root = _root(trace)
    spans: list[MicroBatchSpan] = []
    in_step = False
    for marker in trace.markers:
        if marker.kind == "micro_batch":
            spans.append(MicroBatchSpan(start=marker.event))
            in_step = True
        if marker.kind == "optimizer":
            in_step = False
        if not spans or not in_step:
            continue
        span = spans[-1]
        span.markers.append(marker)
        if marker.kind == "grad":
            if span.first_grad < 0:
                span.first_grad = marker.event
            span.grad_position.setdefault(marker.index, marker.event)
        elif marker.kind == "bwd_end" and marker.index == root:
            span.backward_end = marker.event
        elif marker.kind in UNIT_SPANS:
            getattr(span, marker.kind).setdefault(marker.index, marker.event)
    for span in spans:
        if span.first_grad < 0:
            span.first_grad = span.backward_end
    return spans


def _gradient_contributions(trace: StepTrace) -> dict[tuple[int, int], list[int]]:
    """In the first micro-batch the ``.grad`` itself; later, each new contribution, which
    AccumulateGrad adds into ``.grad`` in place and then frees: the tracer recorded the storage
    it summed on the parameter's grad marker (step_trace.py ``Marker.storage``)."""
    found: dict[tuple[int, int], list[int]] = {}
    micro = -1
    for marker in trace.markers:
        if marker.kind == "micro_batch":
            micro = marker.index
        if marker.kind != "grad":
            continue
        storage = trace.params[marker.index].grad_storage if micro == 0 else marker.storage
        found.setdefault((micro, marker.index), []).extend([storage] if storage >= 0 else [])
    return found
