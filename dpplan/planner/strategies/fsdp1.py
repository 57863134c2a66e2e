"""fsdp-full, fsdp-grad-op, fsdp-no-shard, fsdp-hybrid: FSDP1 (``FullyShardedDataParallel``,
``use_orig_params=True``, torch's defaults: BACKWARD_PRE prefetch, ``limit_all_gathers``) with
ShardingStrategy FULL_SHARD, SHARD_GRAD_OP, NO_SHARD and HYBRID_SHARD.

Each unit (and the root) owns one flat parameter (torch/distributed/fsdp/_flat_param.py).
Replayed over the unwrapped trace, one rank holds (file names under torch/distributed/fsdp/):
  - its shard of each flat parameter, always (``FlatParamHandle.shard``), in the parameters'
    own dtype (fp32 behind mixed precision); the traced parameters are views into it;
  - the padded unsharded flat parameter from a unit's pre-forward (``_unshard``; mixed
    precision first casts the shard into ``_mp_shard``) until its post-forward (FULL_SHARD,
    HYBRID_SHARD; never for the root, ``_post_forward_reshard``) or post-backward
    (``_post_backward_reshard``); BACKWARD_PRE prefetches the unit before it in forward order
    from each pre-backward hook (``_prefetch_handle``);
  - in backward, the per-parameter gradients until the unit's last one arrives, where
    SplitWithSizesBackward concatenates them into one flat gradient (the forward used views of
    the flat parameter); the post-backward hook reduce-scatters it into a new shard, casts that
    to the parameter dtype and frees the flat gradient (``_reduce_grad``); NO_SHARD all-reduces
    the flat gradient in place and keeps it (``_reduce_grad_no_shard``); under ``no_sync`` the
    flat gradient stays unsharded and the next micro-batch accumulates into it;
  - the sharded gradient until the next step's root pre-forward: ``zero_grad(set_to_none)``
    clears the original parameters' ``.grad`` but not the flat one, which
    ``_reset_flat_param_grad_info_if_needed`` drops in ``_root_pre_forward``;
  - optimizer state and step temporaries for the slice of each original parameter that falls
    in this rank's shard (``_get_shard_metadata``), in fp32 behind mixed precision.
HYBRID_SHARD shards within the node and all-reduces the new gradient shard across nodes in
place. CPUOffload(offload_params=True) ("optimizer+params") keeps the fp32 shard, a pinned
``_cpu_grad`` and the optimizer on the host: the device holds the unsharded parameters, a
transient device copy of the shard per unshard and each new gradient shard until
``prepare_gradient_for_optim``. FSDP1 has no optimizer-only offload.
On a CPU validation run gloo adds temporaries to the collectives (measured with the profiler:
two sequential output-sized buffers per all-gather into a chunk list, one input-sized buffer per
reduce-scatter, none for all-reduce; torch/csrc/distributed/c10d/ProcessGroupGloo.cpp); NCCL
writes in place. The flat parameters are laid out in fsdp1_flat_param.py, and the hooks
replayed in fsdp1_replay.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dpplan.planner.strategies.common import is_param_shaped, mesh_process_groups, scalar_parameter, storages_by_param
from dpplan.planner.strategies.fsdp1_flat_param import FP32_BYTES, SHARDED, flat_params, group_size, shard_rank_of
from dpplan.planner.strategies.fsdp1_replay import Replay
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import RankPlan
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import PARAM_CAST, StepTrace, cached_on_trace

EXHAUSTIVE_RANKS = 8
"""Up to this many shards every shard rank is planned; above, only the likely maxima."""
CANDIDATES_PER_SCORE = 2


def offload_mode(layout: Layout) -> str:
    """``params`` (CPUOffload(offload_params=True)) or ``none``. FSDP1 has no optimizer-only
    offload, so ``optimizer`` plans the one it has (as FSDP2 does), with a note."""
    if layout.offload != "none" and layout.device_type == "cuda":
        return "params"
    return "none"


def offload_notes(layout: Layout) -> list[str]:
    if layout.offload == "none":
        return []
    if layout.device_type == "cpu":
        return ["offload: on a CPU run every byte is host memory already; planned without offload"]
    if layout.offload == "optimizer":
        return ["offload: FSDP1 has no optimizer-only offload; its CPUOffload moves parameters, "
                "gradients and the optimizer step to the host together, planned as optimizer+params"]
    return []


def plan_rank(trace: StepTrace, layout: Layout) -> RankPlan:
    flats = flat_params(trace, layout)
    shard_rank = shard_rank_of(layout, layout.rank)
    offload = offload_mode(layout)
    local = _local_numels(trace, flats, shard_rank)
    timeline = _replayed_hooks(trace, layout, flats, offload).copy()
    _resize_optimizer(timeline, local, offload)
    notes = offload_notes(layout)
    if layout.device_type == "cuda":
        notes.append(
            "FSDP1 frees unsharded parameters and gradients that other CUDA streams still use "
            "through recordStream (docs notes/fsdp.rst): reserved memory can exceed this; "
            "limit_all_gathers bounds it to two all-gathers in flight"
        )
    if layout.grad_accum > 2:
        notes.append("micro-batches between the first and the last keep every unit's unsharded "
                     "gradient through their backward; planned as the last one")
    if trace.settings.optimizer == "adafactor" and layout.strategy in SHARDED:
        notes.append("FSDP1 hands the optimizer 1-D views: Adafactor's factored state is "
                     "planned as traced (2-D), which undercounts it")
    host_bytes = layout.ranks_per_node * _host_bytes(trace, flats, local) if offload == "params" else None
    return RankPlan(timeline=timeline, notes=tuple(notes), host_bytes=host_bytes)


def _replayed_hooks(trace: StepTrace, layout: Layout, flats, offload: str) -> RankTimeline:
    """The rank-independent part of ``plan_rank``: the parameters become views into the flat
    parameter, and FSDP1's hooks insert what they allocate. Shard ranks differ only in their
    optimizer state and step temporaries (``_resize_optimizer``, which touches no storage the
    hooks read), so this is replayed once per layout and copied for each rank. Only the latest
    layout is kept: estimate() plans all ranks of a layout one after the other."""
    key = replace(layout, rank=0)
    cache = cached_on_trace(trace, "fsdp1 replayed hooks", dict)
    if key not in cache:
        timeline = RankTimeline(trace)
        for param in trace.params:
            timeline.scale(param.storage, 0.0)  # views into the flat parameter from now on
        Replay(timeline, flats, layout, offload).run()
        cache.clear()
        cache[key] = timeline
    return cache[key]


def _local_numels(trace: StepTrace, flats, shard_rank: int) -> np.ndarray:
    """Elements of each parameter in this shard rank's shard (``FlatParam.local_numels`` for
    all flat parameters at once)."""
    numels = _param_numels(trace)
    local = np.zeros(len(trace.params), dtype=np.int64)
    for flat in flats:
        if flat is None:
            continue
        index = np.asarray(flat.params)
        if not flat.sharded:
            local[index] = numels[index]
            continue
        lo, hi = shard_rank * flat.shard_numel, (shard_rank + 1) * flat.shard_numel
        start = np.asarray(flat.offsets)
        local[index] = np.maximum(0, np.minimum(hi, start + numels[index]) - np.maximum(lo, start))
    return local


def _param_numels(trace: StepTrace) -> np.ndarray:
    return cached_on_trace(trace, "param numels", lambda: np.array([p.numel for p in trace.params], dtype=np.int64))


def _resize_optimizer(timeline: RankTimeline, local: np.ndarray, offload: str) -> None:
    """Optimizer state and step temporaries cover this rank's slice of each parameter, in
    fp32 behind mixed precision; a parameter with nothing here has no gradient on this rank,
    so the optimizer skips it entirely (torch/optim/adamw.py ``_init_group``). Offloaded, the
    step runs on the host."""
    storages, factors = _state_scales(timeline.trace, local)
    timeline.scale_many(storages, np.zeros(len(storages)) if offload == "params" else factors)


def _host_bytes(trace: StepTrace, flats, local: np.ndarray) -> int:
    """Per rank with CPUOffload(offload_params=True): the pinned shard and ``_cpu_grad``
    (_flat_param.py ``init_flat_param_attributes``), then the optimizer's state and the peak of
    its step, which runs on the host."""
    total = 0
    for flat in flats:
        if flat is not None:
            total += flat.shard_numel * flat.param_itemsize * (2 if flat.trainable else 1)
    scale = np.zeros(len(trace.storage_bytes))
    storages, factors = _state_scales(trace, local)
    scale[storages] = factors
    deltas = trace.event_sign * (trace.storage_bytes * scale)[trace.event_storage]
    return total + (int(np.max(np.cumsum(deltas))) if len(deltas) else 0)


def _state_scales(trace: StepTrace, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every optimizer storage (state and step temporaries) and its size on this rank over
    its traced size, for a rank that holds ``local[i]`` elements of parameter i: 0 without
    any, 1 for storages that are not parameter-shaped (scalars such as Adam's ``step`` are
    kept whole), else the held fraction at the optimizer's element size (fp32 behind mixed
    precision): count / numel * element / traced, in that order, as floats."""
    storages, owner, shaped, numel, element, traced = cached_on_trace(
        trace, "fsdp1 optimizer storages", lambda: _optimizer_storages(trace)
    )
    count = local[owner]
    resized = count / numel * element / traced
    factors = np.where(count == 0, 0.0, np.where(shaped, resized, 1.0))
    return storages, factors


def _optimizer_storages(trace: StepTrace) -> tuple[np.ndarray, ...]:
    """Per optimizer storage: its index, owning parameter, whether it is parameter-shaped,
    the parameter's elements, the optimizer's and the trace's bytes per element."""
    rows = []
    for index, owned in enumerate(storages_by_param(trace)):
        numel = trace.params[index].numel
        for storage in owned.optimizer_state + owned.optimizer_temporary:
            if is_param_shaped(trace, storage, index):
                traced = int(trace.storage_bytes[storage]) // numel
                element = FP32_BYTES if trace.settings.family == PARAM_CAST else traced
                rows.append((storage, index, True, numel, element, traced))
            else:  # kept whole: the ratio is not used (ones keep it finite)
                rows.append((storage, index, False, 1, 1, 1))
    columns = list(zip(*rows)) if rows else [()] * 6
    dtypes = (np.int64, np.int64, bool, np.int64, np.int64, np.int64)
    return tuple(np.asarray(column, dtype=dtype) for column, dtype in zip(columns, dtypes))


def ranks_to_evaluate(trace: StepTrace, layout: Layout) -> list[int]:
    """Shard ranks differ only in which slices of the original parameters they hold, hence in
    optimizer state and step temporaries: plan every one for small groups, else rank 0 and the
    ranks that score highest on state (scalars such as Adam's ``step`` exist only for the
    parameters a rank holds a piece of) and on state plus one parameter's step temporaries."""
    group = group_size(layout)
    if layout.strategy == "fsdp-no-shard" or group == 1:
        return [0]
    if group <= EXHAUSTIVE_RANKS:
        return list(range(group))
    per_element, per_param, per_temp = cached_on_trace(trace, "fsdp1 optimizer bytes", lambda: _optimizer_bytes(trace))
    state = np.zeros(group)
    temp = np.zeros(group)
    ranks = np.arange(group)
    numels = _param_numels(trace)
    for flat in flat_params(trace, layout):
        if flat is None:
            continue
        # count[rank, j]: elements of the flat's j-th parameter in that rank's shard. The
        # scores are whole byte counts far below 2**53, so summing in any order is exact.
        lo, hi = ranks[:, None] * flat.shard_numel, (ranks[:, None] + 1) * flat.shard_numel
        index, start = np.asarray(flat.params), np.asarray(flat.offsets)
        count = np.clip(np.minimum(hi, start + numels[index]) - np.maximum(lo, start), 0, None)
        state += (count * per_element[index]).sum(axis=1) + ((count > 0) * per_param[index]).sum(axis=1)
        temp = np.maximum(temp, (count * per_temp[index]).max(axis=1))
    picks = {0}
    for score in (state, state + temp):
        picks.update(int(r) for r in np.argsort(-score, kind="stable")[:CANDIDATES_PER_SCORE])
    return sorted(picks)


def _optimizer_bytes(trace: StepTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per parameter: state bytes per element, state bytes that do not scale (scalars),
    step-temporary bytes per element."""
    element = FP32_BYTES if trace.settings.family == PARAM_CAST else None
    per_element, per_param, per_temp = (np.zeros(len(trace.params)) for _ in range(3))
    for index, owned in enumerate(storages_by_param(trace)):
        numel = trace.params[index].numel
        for storage in owned.optimizer_state:
            if is_param_shaped(trace, storage, index):
                per_element[index] += element or int(trace.storage_bytes[storage]) // numel
            else:
                per_param[index] += int(trace.storage_bytes[storage])
        for storage in owned.optimizer_temporary:
            if is_param_shaped(trace, storage, index):
                per_temp[index] += element or int(trace.storage_bytes[storage]) // numel
    return per_element, per_param, per_temp


process_groups = mesh_process_groups
"""HYBRID_SHARD communicates in two groups, its mesh's axes: the shard group inside a node and
the replicate group across nodes (``_init_process_group_state`` with a 2-D device mesh)."""


def refusal(model) -> str | None:
    """What the real wrapper says when it refuses to wrap ``model`` (None: it wraps it): a 0-d
    parameter (torch/distributed/fsdp/_init_utils.py ``_validate_frozen_params``/scalar check)."""
    name = scalar_parameter(model)
    if name is None:
        return None
    return f"FSDP doesn't support scalar parameters: {name} is 0-d (the wrapper asks to make it a 1-d tensor with one element)"
