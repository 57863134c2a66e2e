"""Replay a traced step with a strategy's own memory lifecycle, and find its peak.

A strategy (planner/strategies/*) starts from the trace of the unwrapped model and says, for
one rank:
  - ``scale(storage, factor)``: this storage is ``factor`` times its traced size on this rank
    (a shard of a parameter, of its gradient, of its optimizer state; 0 removes it);
  - ``insert(position, nbytes, category)``: allocate (or, negative, free) bytes at a marker,
    in the order the calls are made (FSDP's all-gather buffers, DDP's buckets, ...);
  - ``free_at(storage, position)``: the storage dies at that marker instead of where the
    unwrapped model freed it (an unsharded gradient freed after its reduce-scatter).

Positions are marker positions (``Marker.event``): "after that many trace events". Inserted
events at a position happen before the trace event of the same index, in call order.

Every size is a polynomial in the micro-batch size b (degree 0, 1 or 2, from the trace), so
``peak(b)`` for any b and the largest b under a limit are exact and cost one pass over the
events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpplan.planner.trace import CATEGORY_NAMES, StepTrace

NUM_CATEGORIES = len(CATEGORY_NAMES)


@dataclass(frozen=True, kw_only=True)
class Peak:
    """The highest point of one rank's step."""

    peak_bytes: int
    position: int
    """Index into the merged event sequence where the peak is reached."""
    bytes_by_category: dict[str, int]
    phase: str
    """forward, backward, optimizer (where in the step the peak falls)."""


class RankTimeline:
    """The memory events of one rank under one strategy (see module docstring)."""

    def __init__(self, trace: StepTrace):
        self.trace = trace
        num_storages = len(trace.storage_bytes)
        self.storage_scale = np.ones(num_storages)
        self.storage_death_moved = np.zeros(num_storages, dtype=bool)
        # Inserted events: position, order, constant bytes, linear and quadratic coefficients.
        self._ins_position: list[int] = []
        self._ins_const: list[float] = []
        self._ins_lin: list[float] = []
        self._ins_quad: list[float] = []
        self._ins_category: list[int] = []
        self._merged_cache = None  # _merged() of the events as they are; reset by every change
        self._order_cache = None  # _event_order() for a number of inserted events
        self._moved_deaths: list[tuple] = []  # (insert index, storage, scale when moved)
        self._merge_base: tuple | None = None  # (merged, storage_scale, inserted events, positions) of the copied
        self._merge_base_of_copies: tuple | None = None  # the same, of this timeline as it is when first copied

    def copy(self) -> RankTimeline:
        """An independent timeline with the same events so far."""
        twin = RankTimeline.__new__(RankTimeline)
        twin.trace = self.trace
        twin.storage_scale = self.storage_scale.copy()
        twin.storage_death_moved = self.storage_death_moved.copy()
        twin._ins_position = list(self._ins_position)
        twin._ins_const = list(self._ins_const)
        twin._ins_lin = list(self._ins_lin)
        twin._ins_quad = list(self._ins_quad)
        twin._ins_category = list(self._ins_category)
        twin._moved_deaths = list(self._moved_deaths)
        twin._merged_cache = None
        twin._order_cache = self._order_cache
        # The twin's merge starts from this one's: only events of storages whose scale
        # changes afterwards need new coefficients (FSDP1 copies one replayed timeline per
        # rank and rescales only its optimizer storages).
        if self._merge_base_of_copies is None:
            merged = self._merged()
            self._merge_base_of_copies = (
                merged, self.storage_scale.copy(), len(self._ins_position),
                _merged_position_of_trace_events(self.trace, merged[2], merged[3]),
            )
        twin._merge_base = self._merge_base_of_copies
        return twin

    # -- what strategies call ------------------------------------------------------------
    def scale(self, storage: int, factor: float) -> None:
        if storage >= 0:
            self.storage_scale[storage] = factor
            self._merged_cache = None

    def scale_many(self, storages: np.ndarray, factors: np.ndarray) -> None:
        """``scale`` for many storages at once (indices >= 0, each at most once)."""
        if len(storages):
            self.storage_scale[storages] = factors
            self._merged_cache = None

    def insert(self, position: int, nbytes: float, category: int) -> None:
        """Allocate (positive) or free (negative) ``nbytes`` constant bytes at ``position``."""
        if nbytes == 0:
            return
        self._merged_cache = None
        self._ins_position.append(position)
        self._ins_const.append(float(nbytes))
        self._ins_lin.append(0.0)
        self._ins_quad.append(0.0)
        self._ins_category.append(category)

    def free_at(self, storage: int, position: int) -> None:
        """The storage dies at ``position`` (in insertion order there), not where traced."""
        if storage < 0 or self.storage_death_moved[storage]:
            return
        self.storage_death_moved[storage] = True
        self._merged_cache = None
        # The storage's size as scaled now; its polynomial is filled in by _merge, for all
        # moved deaths at once (placeholders until then).
        self._moved_deaths.append((len(self._ins_position), storage, self.storage_scale[storage]))
        self._ins_position.append(position)
        self._ins_const.append(0.0)
        self._ins_lin.append(0.0)
        self._ins_quad.append(0.0)
        self._ins_category.append(0)

    def apply_in_order(self, events: list[tuple[int, bool, int, int]]) -> None:
        """(position, is_insert, a, b) in call order: ``insert(position, a, b)`` (bytes,
        category) or ``free_at(a, position)``; the same as making those calls one by one."""
        for position, is_insert, a, b in events:
            if is_insert:
                self.insert(position, a, b)
            else:
                self.free_at(a, position)


    def storage_bytes(self, storage: int, batch_size: int) -> int:
        const, lin, quad = self._storage_polynomial(storage)
        return int(round(const + lin * batch_size + quad * batch_size * batch_size))

    # -- evaluation ----------------------------------------------------------------------
    def _storage_polynomial(self, storage: int) -> tuple[float, float, float]:
        trace = self.trace
        nbytes = float(trace.storage_bytes[storage]) * self.storage_scale[storage]
        degree = int(trace.storage_batch_degree[storage])
        prime = trace.trace_batch_size
        coefficients = [0.0, 0.0, 0.0]
        coefficients[degree] = nbytes / prime**degree
        return coefficients[0], coefficients[1], coefficients[2]

    def _merged(self):
        """Per merged event: constant, linear, quadratic delta and category, in time order."""
        if self._merged_cache is None:
            self._merged_cache = self._merge()
        return self._merged_cache

    def _merge(self):
        base = self._merge_base
        if base is not None and len(self._ins_position) == base[2]:
            return self._merge_from(base[0], base[1], base[3])
        trace = self.trace
        storage = trace.event_storage
        sign = trace.event_sign.astype(np.float64)
        scaled = trace.storage_bytes * self.storage_scale
        degree = trace.storage_batch_degree
        prime = float(trace.trace_batch_size)
        per_storage = [np.where(degree == d, scaled / prime**d, 0.0) for d in range(3)]
        keep = ~(self.storage_death_moved[storage] & (trace.event_sign < 0))
        trace_coeffs = [sign * per_storage[d][storage] * keep for d in range(3)]
        trace_category = trace.storage_category[storage]
        if self._ins_position:
            order, is_trace, trace_index = self._event_order()
            ins_coeffs, ins_category = self._inserted_events()
            coeffs = [np.concatenate([trace_coeffs[d], ins_coeffs[d]])[order] for d in range(3)]
            category = np.concatenate([trace_category, ins_category])[order]
        else:
            coeffs = trace_coeffs
            category = trace_category
            is_trace = np.ones(len(storage), bool)
            trace_index = np.arange(len(storage))
        return coeffs, category, is_trace, trace_index

    def _merge_from(self, merged, base_scale: np.ndarray, trace_event_position: np.ndarray):
        """``_merge`` for a copy that only rescaled storages since it was copied: the copied
        timeline's merged events, with the coefficients of the rescaled storages' trace events
        computed again, by the same expression as ``_merge`` (so the values are identical)."""
        (coeffs, category, is_trace, trace_index) = merged
        changed = np.nonzero(self.storage_scale != base_scale)[0]
        if len(changed) == 0:
            return merged
        trace = self.trace
        events = _events_of_storages(trace, changed)
        position = trace_event_position[events]
        storage = trace.event_storage[events]
        sign = trace.event_sign[events].astype(np.float64)
        scaled = trace.storage_bytes[storage] * self.storage_scale[storage]
        degree = trace.storage_batch_degree[storage]
        prime = float(trace.trace_batch_size)
        keep = ~(self.storage_death_moved[storage] & (trace.event_sign[events] < 0))
        new = [c.copy() for c in coeffs]
        for d in range(3):
            new[d][position] = sign * np.where(degree == d, scaled / prime**d, 0.0) * keep
        return new, category, is_trace, trace_index

    def _inserted_events(self):
        """Constant, linear, quadratic coefficients and category of each inserted event, the
        moved deaths' filled in: minus the storage's polynomial at its scale when moved
        (bytes * scale / prime**degree in the degree's coefficient, as _storage_polynomial
        computes it, the others -0.0)."""
        coeffs = [np.asarray(self._ins_const), np.asarray(self._ins_lin), np.asarray(self._ins_quad)]
        category = np.asarray(self._ins_category, dtype=np.int64)
        if self._moved_deaths:
            trace = self.trace
            index, storage, factor = (np.asarray(column) for column in zip(*self._moved_deaths))
            degree = trace.storage_batch_degree[storage]
            nbytes = trace.storage_bytes[storage].astype(np.float64) * factor.astype(np.float64)
            value = nbytes / (np.int64(trace.trace_batch_size) ** degree).astype(np.float64)
            for d in range(3):
                coeffs[d][index] = -np.where(degree == d, value, 0.0)
            category[index] = trace.storage_category[storage]
        return coeffs, category

    def _event_order(self):
        """Where trace and inserted events go in the merged sequence. It depends only on the
        insert positions, which only ever grow by appending, so it is kept for as long as no
        event is inserted (copies share it)."""
        count = len(self._ins_position)
        if self._order_cache is None or self._order_cache[0] != count:
            num_trace = len(self.trace.event_storage)
            # Sort key: inserted events at position p come before trace event p.
            trace_key = np.arange(num_trace, dtype=np.int64) * 2 + 1
            ins_key = np.asarray(self._ins_position, dtype=np.int64) * 2
            order = np.argsort(np.concatenate([trace_key, ins_key]), kind="stable")
            is_trace = np.concatenate([np.ones(num_trace, bool), np.zeros(count, bool)])[order]
            trace_index = np.concatenate([np.arange(num_trace), ins_key // 2])[order]
            self._order_cache = (count, order, is_trace, trace_index)
        return self._order_cache[1:]

    def levels(self, batch_size: int) -> np.ndarray:
        """Live bytes after each merged event."""
        (const, lin, quad), _, _, _ = self._merged()
        return np.cumsum(const + lin * batch_size + quad * batch_size * batch_size)

    def peak(self, batch_size: int) -> Peak:
        (const, lin, quad), category, _, trace_index = self._merged()
        delta = const + lin * batch_size + quad * batch_size * batch_size
        level = np.cumsum(delta)
        position = int(np.argmax(level))
        by_category = np.bincount(category[: position + 1], weights=delta[: position + 1], minlength=NUM_CATEGORIES)
        return Peak(
            peak_bytes=int(round(level[position])),
            position=position,
            bytes_by_category={name: int(round(v)) for name, v in zip(CATEGORY_NAMES, by_category)},
            phase=self._phase_at(int(trace_index[position])),
        )

    def live_blocks_at(self, position: int, batch_size: int) -> np.ndarray:
        """Sizes of the blocks alive at a merged position (int64): each traced storage, and
        what the strategy inserted counted as one block (for allocator rounding)."""
        (const, lin, quad), _, is_trace, trace_index = self._merged()
        upto = position + 1
        trace_events = trace_index[:upto][is_trace[:upto]]
        trace = self.trace
        alive = np.zeros(len(trace.storage_bytes), dtype=np.int64)
        np.add.at(alive, trace.event_storage[trace_events], trace.event_sign[trace_events])
        moved = self.storage_death_moved & (alive > 0)
        sizes = self.trace.storage_bytes_at(batch_size) * self.storage_scale
        kept = sizes[(alive > 0) & ~moved]
        blocks = kept[kept > 0].astype(np.int64)  # truncated, as int() does
        inserted = (const + lin * batch_size + quad * batch_size * batch_size)[:upto][~is_trace[:upto]]
        net = float(inserted.sum()) + float(sizes[moved].sum())
        if net > 0:
            blocks = np.append(blocks, np.int64(int(net)))
        return blocks

    def max_batch_size(self, limit_bytes: float, upper: int = 1 << 20) -> int:
        """Largest micro-batch b >= 1 whose peak is <= ``limit_bytes`` (0 if even b=1 does not fit)."""
        (const, lin, quad), _, _, _ = self._merged()
        a, b1, b2 = np.cumsum(const), np.cumsum(lin), np.cumsum(quad)

        def fits(b: int) -> bool:
            return float(np.max(a + b1 * b + b2 * b * b)) <= limit_bytes

        if not fits(1):
            return 0
        if not np.any((b1 > 0) | (b2 > 0)):
            return upper
        # Closed form for the linear part gives a tight start; confirm by bisection.
        low, high = 1, 2
        while high < upper and fits(high):
            low, high = high, high * 2
        if high >= upper and fits(upper):
            return upper
        while high - low > 1:
            mid = (low + high) // 2
            if fits(mid):
                low = mid
            else:
                high = mid
        return low

    def _phase_at(self, trace_event: int) -> str:
        phase = "forward"
        for marker in self.trace.markers:
            if marker.event > trace_event:
                break
            if marker.kind in ("micro_batch", "pipeline_forward"):
                phase = "forward"
            elif marker.kind == "backward":
                phase = "backward"
            elif marker.kind == "optimizer":
                phase = "optimizer"
        return phase


def _events_of_storages(trace: StepTrace, storages: np.ndarray) -> np.ndarray:
    """Indices of the trace events (births and deaths) of ``storages``, in order."""
    selected = np.zeros(len(trace.storage_bytes), dtype=bool)
    selected[storages] = True
    return np.nonzero(selected[trace.event_storage])[0]


def _merged_position_of_trace_events(trace: StepTrace, is_trace: np.ndarray, trace_index: np.ndarray) -> np.ndarray:
    position = np.empty(len(trace.event_storage), dtype=np.int64)
    position[trace_index[is_trace]] = np.nonzero(is_trace)[0]
    return position


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
