"""zero1, zero2, zero3: ZeRO stages 1-3 with DeepSpeed's defaults (zero1 on CPU: torch's
ZeroRedundancyOptimizer behind DDP, which is what a CPU validation run executes).

Precision. dpplan's mixed precisions keep fp32 parameters and compute under torch.autocast.
DeepSpeed offers exactly that mode: the ``torch_autocast`` config section
(deepspeed/runtime/torch_autocast.py), in which parameters stay fp32, the optimizer's master
partition is an fp32 clone and Linear/Conv parameters communicate their gradients in the
autocast dtype (``init_autocast_params``, LOWER_PRECISION_SAFE_MODULES). That is what these
models assume for bf16-mixed and fp16-mixed. DeepSpeed's own "bf16"/"fp16" sections instead
keep 16-bit parameters beside the fp32 master; dpplan does not model those. ``bf16`` (model in
bf16) is DeepSpeed's bf16 mode: bf16 parameters and gradients, fp32 master partition and fp32
optimizer state (DeepSpeed has no bf16-state default), so its optimizer memory is not the
trace's.

What each rank holds, on top of the traced step (cuda):
  stage 1/2 (deepspeed/runtime/zero/stage_1_and_2.py, DeepSpeedZeroOptimizer): all parameters;
    an fp32 clone of this rank's 1/N slice of the flat parameter buffer and the optimizer state
    of that one flat tensor; one ``reduce_bucket_size`` contiguous-gradient buffer per
    communication dtype; the gradients of the parameters that overlap the slice
    (``grads_in_partition``); stage 1 keeps full autograd gradients until the reduction after
    backward, stage 2 moves each into the bucket as it arrives.
  stage 3 (stage3.py, partition_parameters.py, partitioned_param_coordinator.py): a 1/N shard
    of every parameter, whole copies of small (persistent) parameters, full parameters while
    gathered (prefetch, reuse distance), fp32 master shard, flat optimizer state, a flat
    gradient-partition buffer and the bucket buffers.
"""

from __future__ import annotations

import heapq

import numpy as np

from dpplan.planner.strategies.common import storages_by_param
from dpplan.planner.strategies.ddp import add_gradient_buckets
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.zero_stage3 import plan_stage3
from dpplan.planner.strategies.zero_common import (
    FP32_BYTES,
    MASTER_ALIGNMENT_FACTOR,
    REDUCE_BUCKET_NUMEL,
    comm_groups,
    flat_state_bytes,
    micro_batch_spans,
    notes_for,
    scale_step_temporaries,
    zero_optimizer_state,
)
from dpplan.planner.timeline import RankTimeline, ceil_div
from dpplan.planner.trace import GRADIENT, OPTIMIZER_STATE, OPTIMIZER_TEMPORARY, OTHER, PARAMETER, StepTrace

FP64_BYTES = 8
EXHAUSTIVE_RANKS = 16
"""Up to this many ranks every rank is planned; above, only the candidates for the maximum."""


def stage_of(strategy: str) -> int:
    return {"zero1": 1, "zero2": 2, "zero3": 3}[strategy]


def plan_rank(trace: StepTrace, layout: Layout) -> RankTimeline:
    stage = stage_of(layout.strategy)
    if layout.device_type == "cpu" and stage == 1:
        timeline = plan_torch_zero1(trace, layout)
    elif stage == 3:
        timeline = plan_stage3(trace, layout)
    else:
        timeline = plan_stage12(trace, layout, stage)
    timeline.notes = notes_for(trace, layout) + list(getattr(timeline, "notes", []))
    if not hasattr(timeline, "host_bytes"):
        timeline.host_bytes = None
    return timeline


def ranks_to_evaluate(trace: StepTrace, layout: Layout) -> list[int]:
    world = layout.world_size
    stage = stage_of(layout.strategy)
    if stage == 3:
        return [0]  # every shard is ceil(numel / N): all ranks hold the same bytes
    if layout.device_type == "cpu" and stage == 1:
        if world <= EXHAUSTIVE_RANKS:
            return list(range(world))
        owner = greedy_partition([p.numel for p in trace.params], world)
        owned = np.bincount(owner, weights=[p.numel for p in trace.params], minlength=world)
        largest = owner[int(np.argmax([p.numel for p in trace.params]))]
        return sorted({*np.argsort(-owned, kind="stable")[:4].tolist(), int(largest)})
    # Stage 1/2: equal slices; ranks differ only in the gradients of the parameters that
    # overlap their slice (whole parameters are counted, stage_1_and_2.py copy_grads_in_partition).
    return sorted({0, int(np.argmax(overlapping_numels(trace, world)))})


# -- torch ZeroRedundancyOptimizer (zero1 on a CPU validation run) ---------------------------


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
    start = trace.markers_of("optimizer")[0].event
    end = trace.markers_of("end")[0].event
    events: dict[int, list[int]] = {}
    for k in range(start, end):
        storage = int(trace.event_storage[k])
        owner = int(trace.storage_owner[storage])
        if owner >= 0 and trace.storage_category[storage] == OPTIMIZER_TEMPORARY:
            events.setdefault(owner, []).append(k)
    if not events:
        return
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


# -- DeepSpeed stage 1 and 2 ----------------------------------------------------------------


def flat_layout(trace: StepTrace, world_size: int) -> tuple[list[int], int, int]:
    """Trainable parameter indices in flat order, padded flat numel, slice numel.

    The flat buffer is padded to a multiple of ``nccl_start_alignment_factor * dp_size``
    (stage_1_and_2.py ``flatten_dense_tensors_aligned``) and split into equal slices
    (``get_data_parallel_partitions``)."""
    trainable = [i for i, p in enumerate(trace.params) if p.grad_storage >= 0]
    total = sum(trace.params[i].numel for i in trainable)
    alignment = MASTER_ALIGNMENT_FACTOR * world_size
    padded = ceil_div(total, alignment) * alignment
    return trainable, padded, padded // world_size


def overlapping_numel(trace: StepTrace, world_size: int, rank: int) -> int:
    """Elements of the parameters that overlap ``rank``'s slice, counted whole: the size of
    ``grads_in_partition`` (stage_1_and_2.py ``copy_grads_in_partition``)."""
    return int(overlapping_numels(trace, world_size)[rank])


def overlapping_numels(trace: StepTrace, world_size: int) -> np.ndarray:
    """``overlapping_numel`` for every rank at once."""
    trainable, _, slice_numel = flat_layout(trace, world_size)
    numels = np.array([trace.params[i].numel for i in trainable], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(numels)[:-1]])
    ends = starts + numels
    first_rank = starts // slice_numel  # slice holding each parameter's first element
    last_rank = np.minimum((ends - 1) // slice_numel, world_size - 1)
    total = np.zeros(world_size + 1, dtype=np.int64)
    np.add.at(total, first_rank, numels)
    np.add.at(total, last_rank + 1, -numels)
    return np.cumsum(total)[:world_size]


def largest_slice_piece(trace: StepTrace, world_size: int, rank: int) -> int:
    """Largest part of one parameter inside ``rank``'s slice (its averaged-gradient view)."""
    trainable, _, slice_numel = flat_layout(trace, world_size)
    start, end = rank * slice_numel, (rank + 1) * slice_numel
    offset = largest = 0
    for i in trainable:
        numel = trace.params[i].numel
        largest = max(largest, min(end, offset + numel) - max(start, offset))
        offset += numel
    return largest


def plan_stage12(trace: StepTrace, layout: Layout, stage: int) -> RankTimeline:
    timeline = RankTimeline(trace)
    trainable, padded, slice_numel = flat_layout(trace, layout.world_size)
    if not trainable:
        return timeline
    itemsize = trace.params[trainable[0]].itemsize
    offload = layout.offload != "none"
    by_param = storages_by_param(trace)
    total = sum(trace.params[i].numel for i in trainable)

    # Parameters stay whole; the flat buffer adds its alignment padding.
    timeline.insert(0, (padded - total) * itemsize, PARAMETER)
    # The optimizer steps one flat fp32 tensor: the master slice (``single_partition_of_fp32_groups``,
    # a clone, __init__) and that tensor's state replace the traced per-parameter state.
    zero_optimizer_state(timeline)
    master_bytes = slice_numel * FP32_BYTES
    state_bytes = flat_state_bytes(trace.settings.optimizer, slice_numel)
    if not offload:
        timeline.insert(0, master_bytes + state_bytes, OPTIMIZER_STATE)
        scale_step_temporaries(timeline, by_param, 1.0 / layout.world_size)
    else:
        # cpu_offload: the step runs on the host; the device keeps a staging buffer as large as
        # the largest parameter (``temp_grad_buffer_for_gpu_offload``, __init__).
        scale_step_temporaries(timeline, by_param, 0.0)
        largest = max(trace.params[i].numel for i in trainable)
        timeline.insert(0, largest * itemsize, GRADIENT)

    groups = comm_groups(trace, trainable)
    # One bucket buffer per communication dtype, in the parameters' dtype, double with
    # overlap_comm (False by default below stage 3, zero/config.py ``overlap_comm_valid``),
    # allocated at the first gradient hook of a backward (``setup_buckets``) and released by
    # the epilogue after the reduction (``_release_ipg_buffers``).
    bucket_bytes = len(groups) * REDUCE_BUCKET_NUMEL * itemsize
    partition_grad_bytes = overlapping_numel(trace, layout.world_size, layout.rank) * itemsize
    if offload:
        partition_grad_bytes = 0  # copied straight to the host (``async_inplace_copy_grad_to_fp32_buffer_from_gpu``)
    spans = micro_batch_spans(trace)
    optimizer_pos = trace.markers_of("optimizer")[0].event
    end_pos = trace.markers_of("end")[0].event

    if stage == 1:
        # Stage 1 reduces only at the accumulation boundary, after backward (engine
        # ``allreduce_gradients`` -> ``reduce_gradients``): autograd's gradients live until then.
        timeline.insert(spans[0].first_grad, bucket_bytes, OTHER)
        timeline.free_at_many([trace.params[i].grad_storage for i in trainable], [optimizer_pos] * len(trainable))
        _reduce(timeline, optimizer_pos, groups, itemsize, bucket_bytes, partition_grad_bytes, first=True)
    else:
        # Stage 2: each gradient is copied into the bucket by its hook and autograd's tensor
        # released (``reduce_independent_p_g_buckets_and_remove_grads``); every micro-batch
        # reduces at its end (``independent_gradient_partition_epilogue``).
        hooked = [i for i in trainable if i in spans[0].grad_position]
        timeline.free_at_many(
            [trace.params[i].grad_storage for i in hooked], [spans[0].grad_position[i] for i in hooked]
        )
        for index, span in enumerate(spans):
            timeline.insert(span.first_grad, bucket_bytes, OTHER)
            _reduce(timeline, span.backward_end, groups, itemsize, bucket_bytes, partition_grad_bytes,
                    first=index == 0)
    if not offload:
        # step() first takes the gradient norm (``scaled_global_norm`` ->
        # ``get_grad_norm_direct``: each gradient slice copied to fp64 in turn), then flattens
        # the slice's gradients (cast to fp32) into the master's .grad and releases
        # ``grads_in_partition``; the flat gradient is dropped after the step.
        norm_bytes = largest_slice_piece(trace, layout.world_size, layout.rank) * FP64_BYTES
        timeline.insert(optimizer_pos, norm_bytes, OTHER)
        timeline.insert(optimizer_pos, -norm_bytes, OTHER)
        if itemsize != FP32_BYTES:
            timeline.insert(optimizer_pos, slice_numel * itemsize, GRADIENT)
            timeline.insert(optimizer_pos, slice_numel * FP32_BYTES, GRADIENT)
            timeline.insert(optimizer_pos, -slice_numel * itemsize, GRADIENT)
        else:
            timeline.insert(optimizer_pos, slice_numel * FP32_BYTES, GRADIENT)
        timeline.insert(optimizer_pos, -partition_grad_bytes, GRADIENT)
        timeline.insert(end_pos, -slice_numel * FP32_BYTES, GRADIENT)
    else:
        # Offload takes each gradient's norm on the device as it is copied out
        # (``set_norm_for_param_grad_in_gpu``: ``.double().norm(2)``).
        norm_bytes = largest_slice_piece(trace, layout.world_size, layout.rank) * FP64_BYTES
        norm_pos = optimizer_pos if stage == 1 else spans[-1].backward_end
        timeline.insert(norm_pos, norm_bytes, OTHER)
        timeline.insert(norm_pos, -norm_bytes, OTHER)
        timeline.host_bytes = _host_bytes_stage12(trace, layout, slice_numel, itemsize, state_bytes, trainable)
    return timeline


def _reduce(timeline, position, groups, itemsize, bucket_bytes, partition_grad_bytes, *, first) -> None:
    """One reduction of the buckets (``reduce_ipg_grads`` -> ``average_tensor`` ->
    ``allreduce_and_scatter`` -> ``allreduce_bucket``): the bucket's slices are flattened into
    a new tensor, cast to the communication dtype when it differs, all-reduced and copied back;
    then the gradients of this rank's slice are copied into ``grads_in_partition``
    (allocated at the first copy; on later micro-batches a new one is added into the first,
    ``independent_gradient_partition_epilogue``), and the buckets are released."""
    for numel, comm_size in groups:
        chunk = min(numel, REDUCE_BUCKET_NUMEL)
        timeline.insert(position, chunk * itemsize, OTHER)
        if comm_size != itemsize:
            timeline.insert(position, chunk * comm_size, OTHER)
            timeline.insert(position, -chunk * comm_size, OTHER)
        timeline.insert(position, -chunk * itemsize, OTHER)
    timeline.insert(position, partition_grad_bytes, GRADIENT)
    if not first:
        timeline.insert(position, -partition_grad_bytes, GRADIENT)
    timeline.insert(position, -bucket_bytes, OTHER)


def _host_bytes_stage12(trace, layout, slice_numel, itemsize, state_bytes, trainable) -> int:
    """Pinned host memory per node with offload_optimizer (stage_1_and_2.py __init__ and
    ``initialize_optimizer_states``): fp32 master slice, its fp32 gradient, the flat optimizer
    state, a parameter-dtype copy of the slice (``param_buffer_of_bit16_for_cpu_offload_groups``),
    a staging buffer as large as the largest parameter (``temp_grad_buffer_for_cpu_offload``),
    and with gradient accumulation the per-parameter accumulators
    (``async_accumulate_grad_in_cpu_via_gpu``)."""
    largest = max(trace.params[i].numel for i in trainable)
    per_rank = slice_numel * FP32_BYTES * 2 + state_bytes + slice_numel * itemsize + largest * itemsize
    if layout.grad_accum > 1:
        per_rank += overlapping_numel(trace, layout.world_size, layout.rank) * itemsize
    return per_rank * layout.ranks_per_node
