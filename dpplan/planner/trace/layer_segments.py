"""The repetition rule's first step: which *segment* each event and marker of the short
(3-layer) trace belongs to, the layer whose forward or backward is running when it happens, or
OUTER (embedding, head, loss, ...); and the runs of consecutive items of one segment that the
rule copies once per layer (planner/trace/repetition_rule.py).

  - Between a layer's unit markers an item is that layer's; frees right after a layer returns
    (``x = layer(x)`` drops the previous output) count as that layer's too.
  - At the baseline an event is the layer's that owns its storage (its parameter's, its
    module's).
  - In the optimizer step an event is the layer's of the latest storage born: a per-parameter
    loop frees one parameter's temporary as it makes the next one's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dpplan.planner.trace.layer_stack import OUTER
from dpplan.planner.trace.step_trace import StepTrace

UNIT_MARKERS = ("fwd_start", "fwd_end", "bwd_start", "bwd_end", "recompute_start", "recompute_end")
RESETTING_MARKERS = ("bwd_end", "micro_batch", "backward", "optimizer", "end")
"""Markers (of the root, or of the step) that no layer's forward or backward runs across."""
PHASE_OF_MARKER = {"micro_batch": "forward", "backward": "backward", "optimizer": "optimizer"}


class Item(NamedTuple):
    """One event or marker of the short trace, in trace order."""

    kind: str
    """'e' (an event) or 'm' (a marker)."""
    number: int
    """Event index or marker index in the short trace."""
    segment: int
    """Short layer it belongs to, or OUTER."""
    phase: str
    """baseline, forward, backward or optimizer."""


def segment_items(short: StepTrace, param_layer: list[int], module_layer: list[int]) -> list[Item]:
    """Every event and marker of ``short`` with its segment (module docstring), in order.
    ``param_layer`` and ``module_layer``: the short layer of each parameter and module."""
    t = short
    k = len(t.unit_names) - 1
    markers_at: dict[int, list[int]] = {}
    for i, m in enumerate(t.markers):
        markers_at.setdefault(m.event, []).append(i)
    owner_layer = storage_layer_by_owner(t, param_layer, module_layer)
    items: list[Item] = []
    state = OUTER  # the layer whose forward or backward is running
    phase = "forward"
    optimizer_state = OUTER  # the layer of the latest storage born in the optimizer step
    # Frees right after a layer returns (the caller's ``x = layer(x)`` drops the previous
    # layer's output) belong to that layer: they happen once per layer.
    trailing = OUTER
    num_events = len(t.event_storage)
    for e in range(num_events + 1):
        for i in markers_at.get(e, ()):
            m = t.markers[i]
            phase = PHASE_OF_MARKER.get(m.kind, phase)
            trailing = OUTER
            if m.kind in UNIT_MARKERS and 0 <= m.index < k:
                if m.kind in ("fwd_start", "bwd_start", "recompute_start"):
                    state = segment = m.index
                elif m.kind == "fwd_end":
                    segment, state, trailing = m.index, OUTER, m.index
                elif m.kind == "recompute_end":
                    segment = state = m.index  # back in the unit's own backward
                else:  # bwd_end: may fire once the next layer's backward has begun
                    segment = state
                    if state == m.index:
                        state, trailing = OUTER, m.index
            elif m.kind == "grad":
                segment = param_layer[m.index] if state == OUTER else state
            else:
                segment = OUTER
                if m.kind in RESETTING_MARKERS:
                    state = OUTER  # the first layer's backward has no end marker when
                    # its input needs no gradient: it ends with the step's backward
            items.append(Item("m", i, segment, phase))
        if e == num_events:
            break
        if e < t.num_baseline_events:
            segment = owner_layer[t.event_storage[e]]
        elif phase == "optimizer":
            # A per-parameter loop frees the previous parameter's temporary as it makes
            # the next one's: a free belongs with the latest birth.
            if t.event_sign[e] > 0:
                optimizer_state = owner_layer[t.event_storage[e]]
            segment = optimizer_state
        elif state == OUTER and trailing != OUTER and t.event_sign[e] < 0:
            segment = trailing
        else:
            segment = state
            trailing = OUTER
        items.append(Item("e", e, int(segment), "baseline" if e < t.num_baseline_events else phase))
    return items


def storage_layer_by_owner(short: StepTrace, param_layer: list[int], module_layer: list[int]) -> np.ndarray:
    """Short layer of each storage by what owns it: its parameter's, else its module's, else
    OUTER."""
    layer = np.full(len(short.storage_bytes), OUTER, dtype=np.int64)
    for s in range(len(layer)):
        owner = short.storage_owner[s]
        if owner >= 0:
            layer[s] = param_layer[owner]
        elif short.storage_module[s] >= 0:
            layer[s] = module_layer[short.storage_module[s]]
    return layer


def runs(items: list[Item]) -> list[tuple[int, list[Item]]]:
    """Maximal runs of consecutive items of one segment and phase: [(segment, items)]."""
    found: list[tuple[int, list[Item]]] = []
    for item in items:
        if found and found[-1][0] == item.segment and found[-1][1][-1].phase == item.phase:
            found[-1][1].append(item)
        else:
            found.append((item.segment, [item]))
    return found
