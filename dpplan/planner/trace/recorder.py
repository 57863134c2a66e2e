"""The recorder: collects the storage births and deaths the tracer reports, labelled with what
each storage is and which module made it, and the markers, while the step runs; what it holds
becomes the arrays of a StepTrace (planner/trace/step_trace.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from dpplan.planner.fake_device.fake_tensor import local_tensor
from dpplan.planner.trace.step_trace import OTHER, Marker


class Recorder:
    """Collects storage births and deaths and the markers while the step runs."""

    def __init__(self):
        self.recording = False
        self.event_storage: list[int] = []
        self.event_sign: list[int] = []
        self.storage_bytes: list[int] = []
        self.storage_category: list[int] = []
        self.storage_module: list[int] = []
        self.storage_owner: list[int] = []
        self.live: dict[int, int] = {}  # storage key -> storage index
        self.born_in_op: list[int] = []  # storage indices born in the running op
        self.markers: list[Marker] = []
        self.summed_into: dict[int, int] = {}
        """Storage index -> the storage index last summed into it in place during backward
        (``StorageTracer.on_sum_into``); read and dropped at the parameter's grad marker."""
        self.phase = OTHER
        self.module_stack: list[int] = [-1]

    def alloc(self, key: int, nbytes: int) -> None:
        index = len(self.storage_bytes)
        self.live[key] = index
        self.storage_bytes.append(nbytes)
        self.storage_category.append(self.phase)
        self.storage_module.append(self.module_stack[-1])
        self.storage_owner.append(-1)
        self.born_in_op.append(index)
        self.event_storage.append(index)
        self.event_sign.append(1)

    def free(self, key: int) -> None:
        index = self.live.pop(key, None)
        if index is None:
            return
        self.event_storage.append(index)
        self.event_sign.append(-1)

    def merge(self, new_key: int, old_key: int) -> bool:
        """Storage ``old_key`` dies now, and storage ``new_key`` (just born: the last event) holds
        a sum that the real run would have made in ``old_key``'s memory (a gradient summed in
        place, see ``StorageTracer._note_accumulation``): record the death before the birth, so
        that the two are never alive together. False (nothing changed) when the birth is not the
        last event, a marker follows it, or the sizes differ."""
        new_index, old_index = self.live.get(new_key), self.live.get(old_key)
        if new_index is None or old_index is None or self.storage_bytes[new_index] != self.storage_bytes[old_index]:
            return False
        position = len(self.event_storage) - 1
        if position < 0 or self.event_storage[position] != new_index or self.event_sign[position] != 1:
            return False
        if self.markers and self.markers[-1].event > position:
            return False
        del self.live[old_key]
        self.event_storage.insert(position, old_index)
        self.event_sign.insert(position, -1)
        return True

    def sum_into(self, key: int, operand_key: int) -> None:
        """Storage ``operand_key`` was just added in place into storage ``key`` in backward."""
        index = self.live.get(key)
        if index is not None:
            self.summed_into[index] = self.live.get(operand_key, -1)

    def phase_boundary(self) -> None:
        """An empty storage born and freed: it separates markers that would otherwise share one
        position, so what a strategy inserts at the end of backward (FSDP's root
        post-backward) is told apart from what it inserts at the start of the optimizer step."""
        key = -1 - len(self.storage_bytes)  # no real storage has a negative key
        self.alloc(key, 0)
        self.storage_category[-1] = OTHER
        self.free(key)

    def mark(self, kind: str, index: int = -1, storage: int = -1) -> None:
        self.markers.append(Marker(event=len(self.event_storage), kind=kind, index=index, storage=storage))

    def storage_of(self, tensor: torch.Tensor) -> int:
        return self.live[local_tensor(tensor).untyped_storage()._cdata]

    def owner_of(self, tensor: Any) -> int:
        if not isinstance(tensor, torch.Tensor):
            return -1
        index = self.live.get(local_tensor(tensor).untyped_storage()._cdata)
        return -1 if index is None else self.storage_owner[index]

    def attribute_outputs(self, func, args, outputs) -> None:
        """Optimizer phase: a new storage belongs to the parameter its inputs belong to.

        foreach ops pair list outputs with list inputs element by element.
        """
        born, self.born_in_op = self.born_in_op, []
        if not born:
            return
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        if lists and isinstance(outputs, (list, tuple)):
            for j, out in enumerate(outputs):
                owner = -1
                for lst in lists:
                    if j < len(lst):
                        owner = self.owner_of(lst[j])
                        if owner >= 0:
                            break
                if isinstance(out, torch.Tensor):
                    index = self.live.get(out.untyped_storage()._cdata)
                    if index is not None and self.storage_owner[index] < 0:
                        self.storage_owner[index] = owner
            return
        owner = -1
        for arg in args:
            owner = self.owner_of(arg)
            if owner >= 0:
                break
        for index in born:
            if self.storage_owner[index] < 0:
                self.storage_owner[index] = owner


def move_births_to_baseline(recorder: Recorder, storages: set[int], num_baseline: int) -> int:
    """Make storages created during the traced step exist from its start.

    The step is traced once, from an optimizer without state: torch optimizers create their
    state lazily inside the first ``step()``, with the same temporaries as every later step.
    Moving the births of that state (and of the grad scaler's scale) to the baseline turns
    the first step into the steady-state step, at the price of one optimizer step less to
    trace. Returns the new number of baseline events.
    """
    events = range(num_baseline, len(recorder.event_storage))
    moved = [
        i for i in events if recorder.event_sign[i] > 0 and recorder.event_storage[i] in storages
    ]
    if not moved:
        return num_baseline
    moved_set = set(moved)
    order = list(range(num_baseline)) + moved + [i for i in events if i not in moved_set]
    recorder.event_storage = [recorder.event_storage[i] for i in order]
    recorder.event_sign = [recorder.event_sign[i] for i in order]
    removed_before = np.searchsorted(np.asarray(moved), np.arange(len(order) + 1), side="left")
    recorder.markers = [
        replace(m, event=m.event + len(moved) - int(removed_before[m.event])) for m in recorder.markers
    ]
    return num_baseline + len(moved)


def tensors_in(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and hasattr(item, "keys") and hasattr(item, "values"):
            stack.extend(item.values())
    return found
