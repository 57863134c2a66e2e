"""A trace's content independent of how its storages are numbered: how a trace built by the
repetition rule is checked against a traced one."""

from __future__ import annotations

from dpplan.planner.trace.step_trace import StepTrace


def canonical_form(trace: StepTrace) -> tuple:
    """What a trace says, independent of how its storages are numbered and of the order of
    frees that happen together (no marker between them)."""
    first_seen: dict[int, int] = {}
    for s in trace.event_storage.tolist():
        if s not in first_seen:
            first_seen[s] = len(first_seen)
    cid = [first_seen.get(s, -1) for s in range(len(trace.storage_bytes))]
    marker_events = {m.event for m in trace.markers}
    events = list(zip(trace.event_sign.tolist(), (cid[s] for s in trace.event_storage.tolist())))
    i = 0
    while i < len(events):
        if events[i][0] < 0:
            j = i + 1
            while j < len(events) and events[j][0] < 0 and j not in marker_events:
                j += 1
            events[i:j] = sorted(events[i:j])
            i = j
        else:
            i += 1
    order = sorted(range(len(cid)), key=lambda s: cid[s])
    storages = [
        (
            int(trace.storage_bytes[s]),
            int(trace.storage_batch_degree[s]),
            int(trace.storage_category[s]),
            trace.module_names[trace.storage_module[s]] if trace.storage_module[s] >= 0 else None,
            trace.params[trace.storage_owner[s]].name if trace.storage_owner[s] >= 0 else None,
        )
        for s in order
    ]
    params = [
        (p.name, p.numel, p.itemsize, p.shape, p.unit, cid[p.storage] if p.storage >= 0 else -1,
         cid[p.grad_storage] if p.grad_storage >= 0 else -1)
        for p in trace.params
    ]
    return (
        tuple(events),
        tuple(storages),
        tuple((m.event, m.kind, m.index, cid[m.storage] if m.storage >= 0 else -1) for m in trace.markers),
        tuple(params),
        tuple(trace.unit_names),
        tuple(trace.module_names),
        tuple(trace.module_classes),
        trace.num_baseline_events,
        trace.checkpointing,
    )
