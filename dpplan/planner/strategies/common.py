"""Helpers the strategies share: which traced storages belong to which parameter, and how to
resize them for a shard or a different dtype."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dpplan.planner.gpu_overheads import ProcessGroup
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import (
    GRADIENT,
    OPTIMIZER_STATE,
    OPTIMIZER_TEMPORARY,
    PARAMETER,
    StepTrace,
    cached_on_trace,
)


@dataclass(kw_only=True)
class ParamStorages:
    """Storage indices that belong to one parameter, by category."""

    parameter: list[int] = field(default_factory=list)
    gradient: list[int] = field(default_factory=list)
    optimizer_state: list[int] = field(default_factory=list)
    optimizer_temporary: list[int] = field(default_factory=list)

    def all(self) -> list[int]:
        return self.parameter + self.gradient + self.optimizer_state + self.optimizer_temporary


def storages_by_param(trace: StepTrace) -> list[ParamStorages]:
    """For each parameter (``trace.params`` order) the storages it owns (read-only: computed
    once per trace, every strategy and rank planned from that trace shares it)."""
    return cached_on_trace(trace, "storages_by_param", lambda: _group_storages_by_param(trace))


def _group_storages_by_param(trace: StepTrace) -> list[ParamStorages]:
    result = [ParamStorages() for _ in trace.params]
    owners = trace.storage_owner
    categories = trace.storage_category
    for storage in np.nonzero(owners >= 0)[0]:
        owner = int(owners[storage])
        category = int(categories[storage])
        if category == PARAMETER:
            result[owner].parameter.append(int(storage))
        elif category == GRADIENT:
            result[owner].gradient.append(int(storage))
        elif category == OPTIMIZER_STATE:
            result[owner].optimizer_state.append(int(storage))
        elif category == OPTIMIZER_TEMPORARY:
            result[owner].optimizer_temporary.append(int(storage))
    return result


def is_param_shaped(trace: StepTrace, storage: int, param_index: int) -> bool:
    """True when the storage holds one element per parameter element (a gradient, Adam's
    moments, a step temporary), at any dtype; False for scalars such as Adam's ``step``
    and for factored states (Adafactor's row and column factors)."""
    numel = trace.params[param_index].numel
    nbytes = int(trace.storage_bytes[storage])
    return numel > 1 and nbytes >= numel and nbytes % numel == 0 and nbytes // numel in (1, 2, 4, 8)


@dataclass(frozen=True, kw_only=True)
class OwnedStorages:
    """Every storage of one category owned by a parameter, as arrays (read-only, per trace)."""

    storage: np.ndarray
    owner: np.ndarray
    """Index of the owning parameter."""
    shaped: np.ndarray
    """``is_param_shaped`` of each storage."""
    numel: np.ndarray
    """The owner's elements."""
    element_size: np.ndarray
    """Bytes per element as traced (shaped storages; 1 for the others)."""


def owned_storages(trace: StepTrace, category: str) -> OwnedStorages:
    """``category`` is an attribute of ParamStorages: optimizer_state, optimizer_temporary, ..."""
    return cached_on_trace(trace, ("owned storages", category), lambda: _owned_storages(trace, category))


def _owned_storages(trace: StepTrace, category: str) -> OwnedStorages:
    rows = [
        (storage, index)
        for index, owned in enumerate(storages_by_param(trace))
        for storage in getattr(owned, category)
    ]
    storage = np.asarray([r[0] for r in rows], dtype=np.int64)
    owner = np.asarray([r[1] for r in rows], dtype=np.int64)
    shaped = np.asarray([is_param_shaped(trace, s, i) for s, i in rows], dtype=bool)
    numel = np.asarray([trace.params[i].numel for i in owner.tolist()], dtype=np.int64)
    nbytes = trace.storage_bytes[storage] if len(storage) else np.zeros(0, dtype=np.int64)
    element = np.where(shaped, nbytes // np.maximum(numel, 1), 1)
    return OwnedStorages(storage=storage, owner=owner, shaped=shaped, numel=numel, element_size=element)


def resize_owned_storages(
    timeline: RankTimeline, owned: OwnedStorages, local_numel: np.ndarray, element_size: np.ndarray
) -> None:
    """Make each parameter-shaped storage of ``owned`` hold a shard: parameter i keeps
    ``local_numel[i]`` elements at ``element_size[i]`` bytes each (0: as traced), e.g. fp32
    optimizer state behind bf16 compute. Scalars (Adam's ``step``) are kept."""
    shaped = owned.shaped
    owner = owned.owner[shaped]
    traced = owned.element_size[shaped]
    new_size = np.where(element_size[owner] > 0, element_size[owner], traced)
    factors = (local_numel[owner] / owned.numel[shaped]) * (new_size / traced)
    timeline.scale_many(owned.storage[shaped], factors)


def scalar_parameter(model) -> str | None:
    """The name of the model's first 0-d parameter (FSDP shards along a dim, so it refuses them)."""
    for name, param in model.named_parameters():
        if param.dim() == 0:
            return name
    return None


def mesh_process_groups(layout: Layout) -> list[ProcessGroup]:
    """One communicator per mesh axis of size > 1: what a wrapper that creates no others has
    (DDP, ZeRO, FSDP over their data-parallel axes; HSDP one inside a node, one across)."""
    return [ProcessGroup(num_ranks=axis.size, spans_nodes=axis.spans_nodes) for axis in layout.mesh.axes()]


def wraps_every_model(model) -> str | None:
    """The refusal of a wrapper that takes any module: none."""
    return None
