"""The repetition rule's storages: each storage of the short (3-layer) trace has a *home*, the
segment it is born in (planner/trace/layer_segments.py); the first and last layers' storages
are paired with the middle (template) layer's by aligning their births, and every storage of
the full trace gets one integer name, from which short storage it copies and at which full
layer (planner/trace/repetition_rule.py builds the events from these names).

Names (S = number of short storages): an outer storage s is s; the first layer's storage s is
S + s; the last layer's storage s is 2S + s; the copy at middle layer T of template storage q
is 3S + (T - 1) S + q. The rule renumbers them by first appearance at the end.
"""

from __future__ import annotations

import difflib

import numpy as np

from dpplan.planner.trace.layer_segments import Item
from dpplan.planner.trace.layer_stack import OUTER, LayerStack
from dpplan.planner.trace.step_trace import StepTrace


class NotRepeatable(Exception):
    """The short trace does not follow the repetition rule (internal; means: trace in full)."""


class StorageNames:
    """Homes of the short trace's storages, the end layers' partners in the template layer,
    and the full trace's name for a short storage seen at a full layer (``resolve``)."""

    def __init__(self, short: StepTrace, stack: LayerStack, depth: int, items: list[Item]):
        self.short = short
        self.stack = stack
        self.depth = depth
        self.k = len(short.unit_names) - 1
        home = np.full(len(short.storage_bytes), OUTER - 1, dtype=np.int64)
        births: list[list[int]] = [[] for _ in range(self.k)]
        for kind, index, segment, _ in items:
            if kind == "e" and short.event_sign[index] > 0:
                s = int(short.event_storage[index])
                home[s] = segment
                if segment != OUTER:
                    births[segment].append(s)
        self.home = home
        """Segment each short storage is born in (OUTER - 1: never born in the trace)."""
        self.births = births
        """Storages born in each short layer, in order."""
        self.size = len(home)
        self._match_end_layers()
        self._identity_arrays()

    def resolve(self, s: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """Integer names of layer storages ``s`` seen at full layers ``layer`` (arrays of one
        shape); raises NotRepeatable where the full trace has no such storage."""
        size, last = self.size, self.depth - 1
        home = self.home[s]
        template = self.template_of[s]
        if np.any(template[(layer > 0) & (layer < last)] < 0):
            raise NotRepeatable("an end layer's storage has no partner in the template")
        first = np.where(home == 0, s, self.first_of[np.maximum(template, 0)])
        last_partner = np.where(home == self.k - 1, s, self.last_of[np.maximum(template, 0)])
        at_first, at_last = layer == 0, layer == last
        if np.any(first[at_first] < 0) or np.any(last_partner[at_last] < 0):
            raise NotRepeatable("an end layer lacks a storage the template has")
        middle = 3 * size + (layer - 1) * size + template
        return np.where(at_first, size + first, np.where(at_last, 2 * size + last_partner, middle))

    def _identity_arrays(self) -> None:
        size = self.size
        self.template_of = np.full(size, -1, dtype=np.int64)
        self.first_of = np.full(size, -1, dtype=np.int64)
        self.last_of = np.full(size, -1, dtype=np.int64)
        for s in self.births[1]:
            self.template_of[s] = s
        for end_storage, template in self.to_template.items():
            self.template_of[end_storage] = template
        for template, end_storage in self.from_template[0].items():
            self.first_of[template] = end_storage
        for template, end_storage in self.from_template[self.k - 1].items():
            self.last_of[template] = end_storage

    def _match_end_layers(self) -> None:
        """Pair each storage of the first and last short layer with the template layer's
        storage in the same role, by aligning their births (size, degree, kind, module and
        owner within the layer). The first layer may lack some: its input may need no
        gradient. A template storage with no partner in an end layer is fine as long as
        nothing asks for it there."""
        signature = [self._signature(layer_births) for layer_births in self.births]
        self.to_template: dict[int, int] = {}
        self.from_template: dict[int, dict[int, int]] = {0: {}, self.k - 1: {}}
        for end in (0, self.k - 1):
            matcher = difflib.SequenceMatcher(None, signature[end], signature[1], autojunk=False)
            for block in matcher.get_matching_blocks():
                for i in range(block.size):
                    end_storage = self.births[end][block.a + i]
                    template = self.births[1][block.b + i]
                    self.to_template[end_storage] = template
                    self.from_template[end][template] = end_storage
        if len(self.births[self.k - 1]) != len(self.births[1]) or len(self.from_template[self.k - 1]) != len(
            self.births[1]
        ):
            raise NotRepeatable("layers allocate different numbers of storages")

    def _signature(self, storages: list[int]) -> list[tuple]:
        t = self.short
        out = []
        for s in storages:
            module = int(t.storage_module[s])
            owner = int(t.storage_owner[s])
            out.append((
                int(t.storage_bytes[s]), int(t.storage_batch_degree[s]), int(t.storage_category[s]),
                self._within_layer(t.module_names[module]) if module >= 0 else None,
                self._within_layer(t.params[owner].name) if owner >= 0 else None,
            ))
        return out

    def _within_layer(self, name: str) -> str:
        if self.stack.layer_of(name) == OUTER:
            return name
        rest = name[len(self.stack.prefix):].split(".", 1)
        return "." + rest[1] if len(rest) > 1 else "."
