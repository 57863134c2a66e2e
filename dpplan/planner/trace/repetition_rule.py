"""The repetition rule: the trace of a deep stack of alike layers built from its 3-layer trace.

A 70B transformer is 80 copies of one layer. Tracing all 80 costs seconds per precision
family; tracing a copy of the model cut to 3 layers and to 4 costs a tenth of that. The full
trace follows from the 3-layer one because every middle layer does exactly what the middle
layer of the short model does, shifted by its index:

  - Every event and marker of the 3-layer trace belongs to a *segment*: the layer whose
    forward or backward is running when it happens (between the unit markers; frees right
    after a layer returns, as ``x = layer(x)`` drops the previous output, count as that
    layer's); at the baseline, the layer that owns the storage (its parameter's, its
    module's); in the optimizer step, the layer of the latest storage born (a per-parameter
    loop frees one parameter's temporary as it makes the next one's). Everything else is
    *outer* (embedding, head, loss, ...).
  - A storage's *home* is the segment it is born in. A layer-j segment may touch storages of
    home j-1, j, j+1 or outer; the middle layer's segment must not touch outer storages.
  - Each run of middle-layer items is repeated for layers 1 .. n-2, in ascending order, or
    descending inside backward; a storage of home j+d touched by the copy for layer m is the
    copy for layer m+d. Layers 0 and 2 become layers 0 and n-1. An outer event that frees
    middle-layer storages (autocast's weight cache, freed when the forward leaves autocast;
    foreach optimizer lists) frees every copy.
  - The first and last layers' storages are paired with the middle layer's by aligning their
    births (size, batch degree, kind, module and owner within the layer): the first layer may
    lack some (its input may need no gradient), the last must match all.

The segments are assigned in layer_segments.py, the storages' homes, partners and full-trace
names kept in layer_storages.py; this module copies the runs and builds the StepTrace.

Whether the rule holds for a model is checked by planner/trace/repeated_layers.py, which
traces the 4-layer model too and compares.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dpplan.planner.trace.layer_segments import UNIT_MARKERS, runs, segment_items
from dpplan.planner.trace.layer_stack import OUTER, LayerStack
from dpplan.planner.trace.layer_storages import NotRepeatable, StorageNames
from dpplan.planner.trace.step_trace import Marker, ParamInfo, StepTrace, batch_degree

SHORT_DEPTH = 3
"""The short model the full depth is built from: first layer, middle layer, last layer."""

ROOT_MARKERS = ("root_bwd_start", "root_fwd_end")


# -- the rule ---------------------------------------------------------------------------------


def extend(
    short: StepTrace,
    stack: LayerStack,
    depth: int,
    module_names: list[str],
    module_classes: list[str],
    param_names: list[str],
) -> StepTrace:
    """The trace of the model at ``depth`` layers, built from ``short`` (3 layers) by the
    repetition rule (module docstring). Raises NotRepeatable where the rule does not apply."""
    return _Extension(short, stack, depth, module_names, module_classes, param_names).build()


class _Extension:
    def __init__(self, short, stack, depth, module_names, module_classes, param_names):
        self.short = short
        self.stack = stack
        self.depth = depth
        self.k = len(short.unit_names) - 1
        if self.k != SHORT_DEPTH:
            raise NotRepeatable("the short trace must hold three layers")
        self.module_names = module_names
        self.module_classes = module_classes
        self.module_index = {name: i for i, name in enumerate(module_names)}
        self.param_index = {name: i for i, name in enumerate(param_names)}
        self.param_names = param_names
        self.short_param_index = {p.name: i for i, p in enumerate(short.params)}
        # Layer of each short module and parameter.
        self.module_layer = [stack.layer_of(n) for n in short.module_names]
        self.param_layer = [p.unit if p.unit < self.k else OUTER for p in short.params]
        for p, info in enumerate(short.params):
            if stack.layer_of(info.name) != self.param_layer[p]:
                raise NotRepeatable(f"parameter {info.name} lies outside its unit")

    # -- building ---------------------------------------------------------------------------
    def build(self) -> StepTrace:
        t = self.short
        items = segment_items(t, self.param_layer, self.module_layer)
        self.names = StorageNames(t, self.stack, self.depth, items)
        self.home, self.size = self.names.home, self.names.size

        pieces: list[np.ndarray] = []
        signs: list[np.ndarray] = []
        markers: list[Marker] = []
        position = 0
        num_baseline = None
        for segment, run in runs(items):
            phase = run[0].phase
            if phase != "baseline" and num_baseline is None:
                num_baseline = position
            elif phase == "baseline" and num_baseline is not None:
                raise NotRepeatable("the baseline is not a prefix")
            events = np.asarray([index for kind, index, _, _ in run if kind == "e"], dtype=np.int64)
            marks = []  # (marker index, events of the run before it)
            count = 0
            for kind, index, _, _ in run:
                if kind == "e":
                    count += 1
                else:
                    marks.append((index, count))
            if segment == 1:
                layers = list(range(1, self.depth - 1))
                if phase == "backward":
                    layers.reverse()
            elif segment == OUTER:
                layers = [OUTER]
            else:
                layers = [self._full_layer(segment)]
            run_signs = t.event_sign[events]
            if segment == OUTER:
                widths = self._outer_widths(events)
                ids, copy_starts = self._outer_run(events, widths), [0]
                # fan-out moves the markers of an outer run: count output events before each
                expanded = np.cumsum(np.concatenate([[0], widths]))
                marks = [(i, int(expanded[c])) for i, c in marks]
                signs.append(np.repeat(run_signs, widths))
            else:
                ids = self._layer_run(events, segment, np.asarray(layers, dtype=np.int64))
                copy_starts = [c * len(events) for c in range(len(layers))]
                signs.append(np.tile(run_signs, len(layers)))
            for c, full_layer in enumerate(layers):
                for i, offset in marks:
                    markers.append(self._marker(i, segment, full_layer, position + copy_starts[c] + offset))
            pieces.append(ids)
            position += len(ids)
        if num_baseline is None:
            num_baseline = position
        raw = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        return self._trace(raw, np.concatenate(signs), markers, num_baseline)

    def _layer_run(self, events: np.ndarray, segment: int, layers: np.ndarray) -> np.ndarray:
        """Names of a layer run's events for each of its copies, copy after copy."""
        s = self.short.event_storage[events]
        home = self.home[s]
        outer = home == OUTER
        if segment == 1 and np.any(outer):
            raise NotRepeatable("the template layer touches an outer storage")
        target = layers[:, None] + (home - segment)[None, :]
        layer_columns = ~outer
        if np.any((target[:, layer_columns] < 0) | (target[:, layer_columns] >= self.depth)):
            raise NotRepeatable("a layer reaches past the ends of the stack")
        s_grid = np.broadcast_to(s, target.shape)
        ids = np.where(outer[None, :], s_grid, 0)
        if np.any(layer_columns):
            ids[:, layer_columns] = self.names.resolve(s_grid[:, layer_columns], target[:, layer_columns])
        return ids.reshape(-1)

    def _outer_widths(self, events: np.ndarray) -> np.ndarray:
        """Output events per outer-run event: every middle copy for a template storage."""
        home = self.home[self.short.event_storage[events]]
        return np.where(home == 1, self.depth - 2, 1)

    def _outer_run(self, events: np.ndarray, widths: np.ndarray) -> np.ndarray:
        t = self.short
        s = t.event_storage[events]
        home = self.home[s]
        if np.any((home == 1) & (t.event_sign[events] > 0)):
            raise NotRepeatable("a template storage born outside its layer")
        s_rep = np.repeat(s, widths)
        home_rep = np.repeat(home, widths)
        # Within each fanned-out event, the middle layers 1 .. n-2 in order.
        starts = np.repeat(np.cumsum(widths) - widths, widths)
        copy = np.arange(len(s_rep)) - starts
        layer = np.where(home_rep == 1, copy + 1, np.where(home_rep == 0, 0, self.depth - 1))
        ids = s_rep.copy()
        inside = home_rep != OUTER
        if np.any(inside):
            ids[inside] = self.names.resolve(s_rep[inside], layer[inside])
        return ids

    def _marker(self, i: int, segment: int, full_layer: int, event: int) -> Marker:
        m = self.short.markers[i]
        index = m.index
        if m.kind in UNIT_MARKERS or m.kind in ROOT_MARKERS:
            index = self.depth if index == self.k else self._target(index, segment, full_layer)
        elif m.kind == "grad":
            index = self._full_param(index, self._target(self.param_layer[index], segment, full_layer))
        storage = m.storage if m.storage < 0 else self._storage_name(m.storage, segment, full_layer)
        return Marker(event=event, kind=m.kind, index=index, storage=storage)

    def _storage_name(self, s: int, segment: int, full_layer: int) -> int:
        """Integer name of short storage ``s`` seen from a run of ``segment`` placed at
        ``full_layer`` (as the run's events name it); renumbered with the events in ``_trace``."""
        home = int(self.home[s])
        if home == OUTER:
            return s
        layer = self._target(home, segment, full_layer)
        return int(self.names.resolve(np.asarray([s]), np.asarray([layer]))[0])

    def _full_layer(self, short_layer: int) -> int:
        """Short layers 0 and 2 are the full model's first and last (1 is the template)."""
        if short_layer == 0:
            return 0
        if short_layer == self.k - 1:
            return self.depth - 1
        raise NotRepeatable("the template layer has no fixed place")

    def _target(self, ref_layer: int, segment: int, full_layer: int) -> int:
        """Full layer of something in short layer ``ref_layer`` seen from a run of
        ``segment`` placed at ``full_layer``."""
        if ref_layer == OUTER:
            return OUTER
        if segment == OUTER:
            return self._full_layer(ref_layer)
        target = full_layer + (ref_layer - segment)
        if not 0 <= target < self.depth:
            raise NotRepeatable("a layer reaches past the ends of the stack")
        return target

    def _full_param(self, p: int, layer: int) -> int:
        name = self.short.params[p].name
        if layer != OUTER:
            name = self.stack.renamed(name, layer)
        full = self.param_index.get(name)
        if full is None:
            raise NotRepeatable(f"no parameter {name} in the full model")
        return full

    def _trace(self, raw: np.ndarray, signs: np.ndarray, markers: list[Marker], num_baseline: int) -> StepTrace:
        t = self.short
        size, depth = self.size, self.depth
        names, first_index, inverse = np.unique(raw, return_index=True, return_inverse=True)
        order = np.argsort(first_index, kind="stable")
        number = np.empty(len(order), dtype=np.int64)
        number[order] = np.arange(len(order))
        event_storage = number[inverse.reshape(-1)]
        # Decode each storage's name, in the new order: its short source and full layer.
        name = names[order]
        kind = np.minimum(name // size, 3)
        source = np.where(kind < 3, name - kind * size, (name - 3 * size) % size)
        layer = np.select([kind == 0, kind == 1, kind == 2], [OUTER, 0, depth - 1], (name - 3 * size) // size + 1)
        module = self._relocated(t.storage_module[source], self.module_layer, source, layer, self._module_table())
        owner = self._relocated(t.storage_owner[source], self.param_layer, source, layer, self._param_table())
        number_of = dict(zip(name.tolist(), range(len(name))))
        if any(m.storage >= 0 and m.storage not in number_of for m in markers):
            raise NotRepeatable("a marker's storage never appears")
        markers = [m if m.storage < 0 else replace(m, storage=number_of[m.storage]) for m in markers]
        shorts, layers = [], []
        for full_name in self.param_names:
            full_layer = self.stack.layer_of(full_name)
            short_layer = OUTER if full_layer == OUTER else (
                0 if full_layer == 0 else self.k - 1 if full_layer == depth - 1 else 1
            )
            short_name = full_name if full_layer == OUTER else self.stack.renamed(full_name, short_layer)
            p = self.short_param_index.get(short_name)
            if p is None:
                raise NotRepeatable(f"no parameter {short_name} in the short model")
            shorts.append(p)
            layers.append(full_layer)
        layer_array = np.asarray(layers, dtype=np.int64)
        storages = self._param_storages([t.params[p].storage for p in shorts], layer_array, number_of)
        grads = self._param_storages([t.params[p].grad_storage for p in shorts], layer_array, number_of)
        params = [
            ParamInfo(
                name=full_name,
                numel=t.params[p].numel,
                itemsize=t.params[p].itemsize,
                shape=t.params[p].shape,
                unit=depth if t.params[p].unit == self.k else full_layer,
                storage=storage,
                grad_storage=grad,
                holder_classes=t.params[p].holder_classes,
            )
            for full_name, p, full_layer, storage, grad in zip(self.param_names, shorts, layers, storages, grads)
        ]
        storage_bytes = t.storage_bytes[source]
        return StepTrace(
            settings=t.settings,
            trace_batch_size=t.trace_batch_size,
            event_storage=event_storage,
            event_sign=np.asarray(signs, dtype=np.int64),
            storage_bytes=storage_bytes,
            storage_batch_degree=batch_degree(storage_bytes, t.trace_batch_size),
            storage_category=t.storage_category[source],
            storage_module=module,
            storage_owner=owner,
            num_baseline_events=num_baseline,
            markers=markers,
            params=params,
            unit_names=[self.stack.prefix + str(i) for i in range(depth)] + ["(root)"],
            module_names=self.module_names,
            module_classes=self.module_classes,
            num_ops=t.num_ops,
            checkpointing=t.checkpointing,
            notes=t.notes,
        )

    def _module_table(self) -> np.ndarray:
        """Full index of each short module placed at each full layer (-1: none)."""
        return self._table(self.short.module_names, self.module_layer, self.module_index)

    def _param_table(self) -> np.ndarray:
        return self._table([p.name for p in self.short.params], self.param_layer, self.param_index)

    def _table(self, short_names: list[str], short_layer: list[int], full_index: dict[str, int]) -> np.ndarray:
        table = np.full((max(len(short_names), 1), self.depth), -1, dtype=np.int64)
        for i, name in enumerate(short_names):
            if short_layer[i] == OUTER:
                table[i, :] = full_index.get(name, -1)
            else:
                table[i, :] = [full_index.get(self.stack.renamed(name, layer), -1) for layer in range(self.depth)]
        return table

    def _relocated(self, refs, ref_layer, source, layer, table) -> np.ndarray:
        """Full indices of modules or parameters ``refs`` (short indices, -1: none) of storages
        from short ``source`` placed at full ``layer``: a reference inside the stack keeps its
        distance to the storage's home layer."""
        refs = np.asarray(refs, dtype=np.int64)
        present = refs >= 0
        ref_layer = np.asarray(ref_layer, dtype=np.int64)[np.maximum(refs, 0)]
        home = self.home[source]
        end_place = np.where(ref_layer == 0, 0, self.depth - 1)
        if np.any(present & (ref_layer == 1) & ((home == OUTER) | (layer == OUTER))):
            raise NotRepeatable("the template layer seen from outside the stack")
        place = np.where((home == OUTER) | (layer == OUTER), end_place, layer + (ref_layer - home))
        place = np.where(ref_layer == OUTER, 0, place)
        if np.any(present & ((place < 0) | (place >= self.depth))):
            raise NotRepeatable("a reference past the ends of the stack")
        full = table[np.maximum(refs, 0), np.clip(place, 0, self.depth - 1)]
        if np.any(present & (full < 0)):
            raise NotRepeatable("a module or parameter missing from the full model")
        return np.where(present, full, -1)

    def _param_storages(self, short: list[int], layer: np.ndarray, number_of: dict[int, int]) -> list[int]:
        """New numbers of the storages ``short`` (short indices, -1: none) of parameters at
        full ``layer``."""
        short_array = np.asarray(short, dtype=np.int64)
        name = short_array.copy()
        inside = (short_array >= 0) & (self.home[np.maximum(short_array, 0)] != OUTER)
        if np.any(inside):
            name[inside] = self.names.resolve(short_array[inside], layer[inside])
        numbers = []
        for s, n in zip(short, name.tolist()):
            if s < 0:
                numbers.append(-1)
            elif n not in number_of:
                raise NotRepeatable("a parameter's storage never appears")
            else:
                numbers.append(number_of[n])
        return numbers

