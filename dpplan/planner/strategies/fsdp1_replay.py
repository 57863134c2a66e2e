"""FSDP1's runtime hooks replayed over the unwrapped trace, for one rank (planner/strategies/
fsdp1.py says what each strategy holds). Paths below are under torch/distributed/fsdp/.

The walk turns the trace's markers into FSDP1's hook calls in time order (``schedule``) and
runs each with FSDP1's own state per unit: whether the padded unsharded flat parameter is
allocated, in use, prefetched; whether an unsharded flat gradient survives a ``no_sync``
micro-batch. Each hook inserts the bytes FSDP1 allocates and frees there, in FSDP1's order,
which is what makes the transient peaks of the collectives and casts exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpplan.planner.strategies.fsdp1_flat_param import FlatParam
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import GRADIENT, PARAM_CAST, PARAMETER, TEMPORARY, trace_index

if TYPE_CHECKING:
    from dpplan.planner.strategies.layout import Layout

RESHARD_AFTER_FORWARD = ("fsdp-full", "fsdp-hybrid")
"""_flat_param.py RESHARD_AFTER_FORWARD_HANDLE_STRATEGIES (FULL_SHARD, HYBRID_SHARD): free the
unsharded parameter after forward, and in backward even under no_sync
(_runtime_utils.py ``_post_forward_reshard``, ``_should_free_in_backward``)."""


class Replay:
    """Walks the trace's markers and inserts FSDP1's allocations where FSDP1 makes them."""

    def __init__(self, timeline: RankTimeline, flats, layout: Layout, offload: str):
        self.timeline = timeline
        self.trace = timeline.trace
        self.flats = flats
        self.strategy = layout.strategy
        self.gloo = layout.device_type == "cpu"
        self.offload = offload
        self.mixed = self.trace.settings.family == PARAM_CAST
        self.root = len(self.trace.unit_names) - 1
        n = len(flats)
        self.allocated = [False] * n  # unsharded parameter (or NO_SHARD's low-precision copy)
        self.in_use = [False] * n  # the module computes with unsharded views
        self.prefetched = [False] * n
        self.needs_backward = [False] * n
        self.grad_alive = [False] * n  # unsharded flat gradient (kept under no_sync)
        self.device_grad = [0] * n  # offload: sharded gradient on the device until optim
        # (micro-batch, parameter) -> the traced gradient storages FSDP's cat consumes instead
        self.gradients = trace_index(self.trace).gradient_contributions
        self.p = 0  # the marker position the running hook inserts at

    # -- byte sizes ----------------------------------------------------------------------
    def unsharded_bytes(self, flat: FlatParam) -> int:
        return flat.numel * flat.compute_itemsize

    def shard_bytes(self, flat: FlatParam, itemsize: int) -> int:
        return flat.shard_numel * itemsize

    def kept_grad_bytes(self, flat: FlatParam) -> int:
        """The gradient the optimizer sees, alive until the next root pre-forward."""
        if not flat.trainable or self.offload == "params":
            return 0
        return self.shard_bytes(flat, flat.param_itemsize)

    # -- the walk --------------------------------------------------------------------------
    def run(self) -> None:
        timeline = self.timeline
        flats = [f for f in self.flats if f is not None]
        if self.offload != "params":
            timeline.insert(0, sum(self.shard_bytes(f, f.param_itemsize) for f in flats), PARAMETER)
        timeline.insert(0, sum(self.kept_grad_bytes(f) for f in flats), GRADIENT)
        for position, _, _, kind, unit, micro in self.schedule():
            self.p = position
            getattr(self, kind)(unit, micro)

    def schedule(self) -> list[tuple]:
        """FSDP1's hook calls in time order: (position, priority, sequence, hook, unit, micro)."""
        trace = self.trace
        events: list[tuple] = []
        micro = -1
        forward_order: list[int] = []
        spans: dict[tuple[int, int], dict] = {}
        for seq, marker in enumerate(trace.markers):
            kind, index, pos = marker.kind, marker.index, marker.event
            if kind == "micro_batch":
                micro = index
            elif kind == "fwd_start":
                hook = "root_pre_forward" if index == self.root else "pre_forward"
                events.append((pos, 1, seq, hook, index, micro))
            elif kind == "fwd_end":
                events.append((pos, 1, seq, "post_forward", index, micro))
                if micro == 0:
                    forward_order.append(index)
            elif kind == "root_fwd_end":
                events.append((pos, 1, seq, "post_forward", self.root, micro))
            elif kind == "root_bwd_start":
                events.append((pos, 1, seq, "pre_backward", self.root, micro))
            elif kind == "bwd_start":
                events.append((pos, 1, seq, "pre_backward", index, micro))
            if kind in ("bwd_start", "bwd_end", "grad"):
                unit = trace.params[index].unit if kind == "grad" else index
                spans.setdefault((micro, unit), {}).setdefault(kind, []).append(pos)
            if kind == "bwd_end" and index == self.root:
                spans.setdefault((micro, self.root), {})["end"] = pos
        # _exec_order_utils.py ``get_handle_to_backward_prefetch``: the handle one before this
        # one's first post-forward; the root's post-forward comes last.
        order = list(dict.fromkeys(forward_order)) + [self.root]
        before = {u: (forward_order[forward_order.index(u) - 1] if forward_order.index(u) > 0 else None)
                  for u in order[:-1]}
        before[self.root] = forward_order[-1] if forward_order else None
        self.forward_order = order
        self.prefetch_target = before
        num_micro = trace_index(trace).num_micro_batches
        self.last_micro = num_micro - 1
        for m in range(num_micro):
            end = spans.get((m, self.root), {}).get("end")
            for rank_in_backward, unit in enumerate(reversed(self.forward_order)):
                pos = self._post_backward_position(spans, m, unit, before.get(unit), end)
                if pos is not None:
                    events.append((pos, 0, rank_in_backward, "post_backward", unit, m))
            if end is not None:
                events.append((end, 0, len(self.forward_order) + 1, "backward_end", self.root, m))
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        return events

    def _post_backward_position(self, spans, m, unit, previous, end):
        """After the unit's last gradient, before the first backward op of what ran before it:
        its flat parameter's AccumulateGrad runs when the engine reaches the views made in the
        unit's pre-forward (torch/csrc/autograd/engine.cpp orders ready nodes by sequence)."""
        own = spans.get((m, unit), {})
        grads = own.get("grad", [])
        if unit == self.root:
            return end if grads else None
        if not grads:
            return None
        bounds = own.get("bwd_end", []) + spans.get((m, previous), {}).get("bwd_start", [])
        if end is not None:
            bounds.append(end)
        return max(max(grads), min(bounds)) if bounds else max(grads)

    # -- helpers ---------------------------------------------------------------------------
    def add(self, nbytes: int, category: int) -> None:
        self.timeline.insert(self.p, nbytes, category)

    def unshard(self, unit: int) -> None:
        """_runtime_utils.py ``_unshard``: ``pre_unshard``, ``unshard``, ``post_unshard``."""
        flat = self.flats[unit]
        self.in_use[unit] = True
        if flat is None or self.allocated[unit]:
            return
        low = self.shard_bytes(flat, flat.compute_itemsize)
        full = self.shard_bytes(flat, flat.param_itemsize)
        offloaded = self.offload == "params"
        if self.mixed:
            self.add(low, PARAMETER)  # _use_low_precision_shard: _mp_shard ...
            if offloaded:
                self.transient(full)  # ... copied from _local_shard.to(device)
        elif offloaded:
            self.add(full, PARAMETER)  # flat_param_to(device)
        if not flat.sharded:
            # NO_SHARD computes on that copy (or on the flat parameter itself) until reshard.
            self.allocated[unit] = self.mixed or offloaded
            return
        unsharded = self.unsharded_bytes(flat)
        self.add(unsharded, PARAMETER)  # _alloc_padded_unsharded_flat_param
        if self.gloo:
            # _all_gather_flat_param on CPU: dist.all_gather into a chunk list; gloo stages
            # the output in a flat buffer, then copies out through a second one.
            self.transient(unsharded)
            self.transient(unsharded)
        if self.mixed:
            self.add(-low, PARAMETER)  # post_unshard: _free_low_precision_sharded_param
        elif offloaded:
            self.add(-full, PARAMETER)  # the device copy dies with the all-gather's frame
        self.allocated[unit] = True

    def transient(self, nbytes: int) -> None:
        self.add(nbytes, TEMPORARY)
        self.add(-nbytes, TEMPORARY)

    def reshard(self, unit: int, free: bool) -> None:
        """``FlatParamHandle.reshard`` and ``post_reshard``."""
        flat = self.flats[unit]
        self.in_use[unit] = False
        self.prefetched[unit] = False
        if flat is None or not self.allocated[unit]:
            return
        if flat.sharded and free:
            self.add(-self.unsharded_bytes(flat), PARAMETER)
            self.allocated[unit] = False
        elif not flat.sharded:
            itemsize = flat.compute_itemsize if self.mixed else flat.param_itemsize
            self.add(-self.shard_bytes(flat, itemsize), PARAMETER)
            self.allocated[unit] = False

    def prefetch(self, unit: int | None) -> None:
        if unit is not None and self.needs_backward[unit] and not self.prefetched[unit]:
            self.unshard(unit)
            self.prefetched[unit] = True

    # -- FSDP1's hooks ---------------------------------------------------------------------
    def root_pre_forward(self, unit: int, micro: int) -> None:
        if micro == 0:  # _reset_flat_param_grad_info_if_needed: last step's gradients go
            self.add(-sum(self.kept_grad_bytes(f) for f in self.flats if f is not None), GRADIENT)
        self.unshard(unit)

    def pre_forward(self, unit: int, micro: int) -> None:
        self.unshard(unit)

    def post_forward(self, unit: int, micro: int) -> None:
        self.reshard(unit, free=unit != self.root and self.strategy in RESHARD_AFTER_FORWARD)
        self.needs_backward[unit] = True

    def pre_backward(self, unit: int, micro: int) -> None:
        if self.needs_backward[unit] and not self.prefetched[unit]:
            self.unshard(unit)
        self.in_use[unit] = True
        self.needs_backward[unit] = False
        self.prefetch(self.prefetch_target.get(unit))

    def post_backward(self, unit: int, micro: int) -> None:
        flat = self.flats[unit]
        if flat is None or not flat.trainable:
            return
        sync = micro == self.last_micro
        compute = flat.compute_itemsize
        unsharded = self.unsharded_bytes(flat)
        # SplitWithSizesBackward: zeros for padding and gradless parameters, then the cat.
        zeros = flat.zero_fill_numel * compute
        self.add(zeros, TEMPORARY)
        self.add(unsharded, GRADIENT)
        self.add(-zeros, TEMPORARY)
        for index in flat.params:
            for storage in self.gradients.get((micro, index), ()):
                self.timeline.free_at(storage, self.p)
        if self.grad_alive[unit]:
            self.add(-unsharded, GRADIENT)  # AccumulateGrad adds into the no_sync gradient
        self.grad_alive[unit] = True
        # _post_backward_hook
        self.reshard(unit, free=flat.sharded and (sync or self.strategy in RESHARD_AFTER_FORWARD))
        if not sync:
            return
        kept = self.shard_bytes(flat, flat.param_itemsize)
        if flat.sharded:
            reduced = self.shard_bytes(flat, compute)
            self.add(reduced, GRADIENT)  # _get_reduce_scatter_tensors: the new shard
            if self.gloo:
                self.transient(unsharded)  # gloo's reduce_scatter_tensor stages its input
            if kept != reduced:  # _cast_grad_to_param_dtype
                self.add(kept, GRADIENT)
                self.add(-reduced, GRADIENT)
            self.add(-unsharded, GRADIENT)  # the unsharded gradient goes with the hook's frame
        elif kept != unsharded:  # NO_SHARD: all-reduce in place, then the cast
            self.add(kept, GRADIENT)
            self.add(-unsharded, GRADIENT)
        self.grad_alive[unit] = False
        if self.offload == "params":
            self.device_grad[unit] = kept  # copied to _cpu_grad; freed in prepare_gradient_for_optim

    def backward_end(self, unit: int, micro: int) -> None:
        """_post_backward_final_callback: reshard what the hooks left, hand gradients over."""
        sync = micro == self.last_micro
        for u, flat in enumerate(self.flats):
            if flat is not None and self.in_use[u]:
                self.reshard(u, free=flat.sharded and (sync or self.strategy in RESHARD_AFTER_FORWARD))
            self.prefetched[u] = False
            self.needs_backward[u] = False
        if sync and any(self.device_grad):
            self.add(-sum(self.device_grad), GRADIENT)
            self.device_grad = [0] * len(self.flats)
