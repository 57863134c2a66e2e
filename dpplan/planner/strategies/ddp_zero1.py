"""ddp-zero1: torch's ZeroRedundancyOptimizer behind DDP (ZeRO stage 1 without DeepSpeed).

DDP's gradient buckets as ``ddp``, and the wrapped optimizer built over this rank's share of
the parameters only (torch/distributed/optim/zero_redundancy_optimizer.py). DeepSpeed's stage 1
is ``zero1`` (strategies/zero.py).
"""

from __future__ import annotations

import heapq

import numpy as np

from dpplan.planner.strategies.common import mesh_process_groups, storages_by_param, wraps_every_model
from dpplan.planner.strategies.ddp import add_gradient_buckets
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import RankPlan
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import OPTIMIZER_TEMPORARY, StepTrace, cached_on_trace, trace_index

EXHAUSTIVE_RANKS = 16
"""Up to this many ranks every rank is planned; above, only the candidates for the maximum."""


process_groups = mesh_process_groups
refusal = wraps_every_model


def plan_rank(trace: StepTrace, layout: Layout) -> RankPlan:
    return RankPlan(timeline=plan_torch_zero1(trace, layout))


def ranks_to_evaluate(trace: StepTrace, layout: Layout) -> list[int]:
    world = layout.world_size
    if world <= EXHAUSTIVE_RANKS:
        return list(range(world))
    numels = [p.numel for p in trace.params]
    owner = greedy_partition(numels, world)
    owned = np.bincount(owner, weights=numels, minlength=world)
    largest = owner[int(np.argmax(numels))]
    return sorted({*np.argsort(-owned, kind="stable")[:4].tolist(), int(largest)})



def greedy_partition(numels: list[int], world_size: int) -> list[int]:
    """Owner rank of each parameter, as ZeroRedundancyOptimizer assigns them: parameters sorted
    by size, largest first (stable), each to the rank with the fewest elements so far, the
    lowest rank on ties (torch/distributed/optim/zero_redundancy_optimizer.py,
    ``_partition_parameters`` and ``_get_min_index``). One parameter group holds every
    parameter, frozen ones included."""
    order = sorted(range(len(numels)), key=lambda i: numels[i], reverse=True)
    heap = [(0, rank) for rank in range(world_size)]
    owner = [0] * len(numels)
    for i in order:
        size, rank = heapq.heappop(heap)
        owner[i] = rank
        heapq.heappush(heap, (size + numels[i], rank))
    return owner


def plan_torch_zero1(trace: StepTrace, layout: Layout) -> RankTimeline:
    """DDP (its gradient buckets) + a local optimizer over this rank's parameters only.

    ZeroRedundancyOptimizer builds the wrapped optimizer on ``_partition_parameters()[rank]``
    (``_init_local_optimizer``), so only owned parameters get state and step temporaries.
    Gradients stay whole (DDP all-reduces all of them; ``zero_grad`` clears every parameter).
    After the local step ``_sync_params`` broadcasts each parameter in place from its owner
    (``_broadcast_params_from_rank``, ``parameters_as_bucket_view=False``): no allocation.
    """
    timeline = RankTimeline(trace)
    add_gradient_buckets(timeline)
    numels = [p.numel for p in trace.params]
    owner = greedy_partition(numels, layout.world_size)
    for i, owned in enumerate(storages_by_param(trace)):
        if owner[i] != layout.rank:
            for storage in owned.optimizer_state + owned.optimizer_temporary:
                timeline.scale(storage, 0.0)
    local_order = [i for i in sorted(range(len(numels)), key=lambda i: numels[i], reverse=True)
                   if owner[i] == layout.rank]
    replay_step_in_order(timeline, local_order)
    return timeline


def replay_step_in_order(timeline: RankTimeline, order: list[int]) -> None:
    """Re-play the traced per-parameter step temporaries in the local optimizer's order.

    The local optimizer's single parameter group lists its parameters largest first (the
    partition order), and the for-loop step keeps some temporaries of a parameter alive into
    later parameters' updates: they are local variables, freed when the same variable is
    rebound (Adam's ``denom``; Adafactor's ``row_var``/``col_var`` only on the next 2-D
    parameter, ``var_estimate`` on the next one of any shape). So the step's peak depends on
    which parameters follow each other. Each parameter's own events keep their traced order;
    a lingering temporary dies at the point of a later parameter's events where, in the trace,
    a temporary of the same role died in a segment of the same shape (same event pattern)."""
    trace = timeline.trace
    analysis = cached_on_trace(trace, "ddp-zero1 step analysis", lambda: _step_analysis(trace))
    if analysis is None:
        return
    start, events, own, lingering, signature, role, death_at = analysis
    sign = trace.event_sign
    store = trace.event_storage
    for p in events:
        for k in events[p]:
            timeline.scale(int(store[k]), 0.0)

    def nbytes(k: int) -> int:
        return int(trace.storage_bytes[store[k]])

    carried: list[int] = []  # storages alive from earlier parameters
    for p in [p for p in order if p in events]:
        due: dict[int, list[int]] = {}
        for storage in carried:
            n = death_at.get((role[storage], signature[p]), 0)
            due.setdefault(len(own[p]) if n is None else n, []).append(storage)
        carried = [s for s in carried if death_at.get((role[s], signature[p]), 0) is None]
        for n, k in enumerate(own[p] + [None]):
            for storage in due.get(n, []):
                if storage not in carried:
                    timeline.insert(start, -int(trace.storage_bytes[storage]), OPTIMIZER_TEMPORARY)
            if k is not None:
                timeline.insert(start, int(sign[k]) * nbytes(k), OPTIMIZER_TEMPORARY)
        carried += [int(store[k]) for k in lingering[p]]
    for storage in carried:
        timeline.insert(start, -int(trace.storage_bytes[storage]), OPTIMIZER_TEMPORARY)


def _step_analysis(trace: StepTrace):
    """What ``replay_step_in_order`` needs of the traced step, whatever the order: each
    parameter's own and lingering temporary events, their segment signatures, the role of each
    lingering storage and where a role dies in a segment of a given signature. Computed once
    per trace (it is quadratic in the parameters; a 70B plan asks for it at every GPU count)."""
    start, end = trace_index(trace).optimizer, trace_index(trace).end
    events: dict[int, list[int]] = {}
    for k in range(start, end):
        storage = int(trace.event_storage[k])
        owner = int(trace.storage_owner[storage])
        if owner >= 0 and trace.storage_category[storage] == OPTIMIZER_TEMPORARY:
            events.setdefault(owner, []).append(k)
    if not events:
        return None
    traced = sorted(events, key=lambda p: events[p][0])
    bounds = {p: (events[p][0], events[traced[n + 1]][0] if n + 1 < len(traced) else end)
              for n, p in enumerate(traced)}
    sign = trace.event_sign
    store = trace.event_storage
    own = {p: [k for k in events[p] if k < bounds[p][1]] for p in traced}
    lingering = {p: [k for k in events[p] if k >= bounds[p][1]] for p in traced}
    # The last parameter's locals die when the step returns: they linger like the same
    # variables of other parameters with as many temporaries (same birth index).
    def birth_index(p: int) -> dict[int, int]:
        return {int(store[k]): n for n, k in enumerate(k for k in events[p] if sign[k] > 0)}

    last = traced[-1]
    last_births = birth_index(last)
    roles: set[int] = set()
    for p in traced[:-1]:
        births = birth_index(p)
        if len(births) == len(last_births):
            roles |= {births[int(store[k])] for k in lingering[p] if int(store[k]) in births}
    for k in list(own[last]):
        if sign[k] < 0 and last_births.get(int(store[k])) in roles:
            own[last].remove(k)
            lingering[last].append(k)
    signature = {p: tuple(int(sign[k]) for k in own[p]) for p in traced}
    # role of a lingering storage: index of its birth among its parameter's own events
    role = {}
    for p in traced:
        births = {int(store[k]): n for n, k in enumerate(own[p]) if sign[k] > 0}
        for k in lingering[p]:
            role[int(store[k])] = (signature[p], births.get(int(store[k]), -1))
    # where such a role dies in a segment of a given signature (None: it survives it)
    death_at: dict[tuple, int | None] = {}
    for p in traced:
        for k in lingering[p]:
            key = role[int(store[k])]
            for q in traced[traced.index(p) + 1:]:
                lo, hi = bounds[q]
                if lo <= k < hi:
                    death_at[(key, signature[q])] = sum(1 for j in own[q] if j < k)
                    break
                death_at.setdefault((key, signature[q]), None)
    return start, events, own, lingering, signature, role, death_at
