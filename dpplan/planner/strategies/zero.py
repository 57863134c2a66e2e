"""zero1, zero2, zero3: DeepSpeed's ZeRO stages 1-3 with its defaults, on every device (torch's
ZeroRedundancyOptimizer is ``ddp-zero1``, strategies/ddp_zero1.py).

Precision, as users mean it (Lightning's DeepSpeedStrategy and accelerate map so):
``bf16-mixed`` / ``fp16-mixed`` are DeepSpeed's "bf16" / "fp16" sections. The engine casts the
parameters (not the buffers) to 16 bits and the trace is taken so (trace.ENGINE_CAST); the
optimizer steps an fp32 master partition; gradients are reduced in the parameter dtype.
``bf16`` (the model in bf16) is the same "bf16" section with the buffers in bf16 too. The
trace's own optimizer state and step are replaced by the flat fp32 master's. DeepSpeed's
``torch_autocast`` section (fp32 parameters under autocast, Linear/Conv gradients reduced in
the autocast dtype: deepspeed/runtime/torch_autocast.py) is what a trace of the AUTOCAST
family gives (zero_common.comm_sizes).

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

import functools
from dataclasses import replace

import numpy as np

from dpplan.planner.strategies.common import mesh_process_groups, wraps_every_model
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import RankPlan
from dpplan.planner.strategies.registry import DEEPSPEED_STAGES
from dpplan.planner.strategies.zero_common import (
    FP32_BYTES,
    MASTER_ALIGNMENT_FACTOR,
    BucketFill,
    bucket_fills,
    comm_groups,
    flat_state_bytes,
    flat_step_temporaries,
    notes_for,
    zero_optimizer_state,
)
from dpplan.planner.strategies.zero_stage3 import plan_stage3
from dpplan.planner.timeline import RankTimeline, ceil_div
from dpplan.planner.trace import GRADIENT, OPTIMIZER_STATE, OTHER, PARAMETER, StepTrace, trace_index

FP64_BYTES = 8


def stage_of(strategy: str) -> int:
    return DEEPSPEED_STAGES[strategy]


process_groups = mesh_process_groups
refusal = wraps_every_model


def plan_rank(trace: StepTrace, layout: Layout) -> RankPlan:
    stage = stage_of(layout.strategy)
    plan = plan_stage3(trace, layout) if stage == 3 else plan_stage12(trace, layout, stage)
    return replace(plan, notes=(*notes_for(trace, layout), *plan.notes))


def ranks_to_evaluate(trace: StepTrace, layout: Layout) -> list[int]:
    world = layout.world_size
    stage = stage_of(layout.strategy)
    if stage == 3:
        return [0]  # every shard is ceil(numel / N): all ranks hold the same bytes
    # Stage 1/2: equal slices; ranks differ only in the gradients of the parameters that
    # overlap their slice (whole parameters are counted, stage_1_and_2.py copy_grads_in_partition).
    return sorted({0, int(np.argmax(overlapping_numels(trace, world)))})


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


def _slice_pieces(trace: StepTrace, world_size: int, rank: int) -> tuple[list[int], np.ndarray]:
    """Trainable parameters in flat order and how many of each one's elements lie in
    ``rank``'s slice of the flat buffer."""
    trainable, _, slice_numel = flat_layout(trace, world_size)
    numels = np.array([trace.params[i].numel for i in trainable], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(numels)[:-1]]) if len(numels) else numels
    start, end = rank * slice_numel, (rank + 1) * slice_numel
    return trainable, np.maximum(0, np.minimum(end, starts + numels) - np.maximum(start, starts))


def largest_slice_piece(trace: StepTrace, world_size: int, rank: int) -> int:
    """Largest part of one parameter inside ``rank``'s slice (its averaged-gradient view)."""
    _, pieces = _slice_pieces(trace, world_size, rank)
    return int(pieces.max(initial=0))


def params_in_partition(trace: StepTrace, world_size: int, rank: int) -> frozenset[int]:
    """Trainable parameters with elements in ``rank``'s slice of the flat buffer."""
    trainable, pieces = _slice_pieces(trace, world_size, rank)
    return frozenset(i for i, piece in zip(trainable, pieces.tolist()) if piece > 0)


def plan_stage12(trace: StepTrace, layout: Layout, stage: int) -> RankPlan:
    timeline = RankTimeline(trace)
    trainable, padded, slice_numel = flat_layout(trace, layout.world_size)
    if not trainable:
        return RankPlan(timeline=timeline)
    itemsize = trace.params[trainable[0]].itemsize
    offload = layout.offload != "none"
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
        flat_step_temporaries(timeline, slice_numel)
    else:
        # cpu_offload: the step runs on the host (its temporaries are in a CPU run's peak, not
        # in a GPU's); the device keeps a staging buffer as large as the largest parameter
        # (``temp_grad_buffer_for_gpu_offload``, __init__).
        flat_step_temporaries(timeline, slice_numel if layout.device_type == "cpu" else 0)
        largest = max(trace.params[i].numel for i in trainable)
        timeline.insert(0, largest * itemsize, GRADIENT)

    zero = layout.zero
    bucket_numel = zero.reduce_bucket_size
    groups = comm_groups(trace, trainable)
    # One bucket buffer per communication dtype, in the parameters' dtype, two with overlap_comm
    # (False by default below stage 3, zero/config.py ``overlap_comm_valid``), allocated at the
    # first gradient hook of a backward (``setup_buckets``) and released by the epilogue after
    # the last reduction (``_release_ipg_buffers``).
    buffers = 2 if zero.overlaps_comm(stage) else 1
    bucket_bytes = len(groups) * bucket_numel * itemsize * buffers
    partition_grad_bytes = overlapping_numel(trace, layout.world_size, layout.rank) * itemsize
    if offload:
        partition_grad_bytes = 0  # copied straight to the host (``async_inplace_copy_grad_to_fp32_buffer_from_gpu``)
    in_partition = params_in_partition(trace, layout.world_size, layout.rank)
    index = trace_index(trace)
    spans, optimizer_pos, end_pos = index.micro_batches, index.optimizer, index.end
    reduce = functools.partial(
        _replay_reductions, timeline, trace, itemsize=itemsize, bucket_bytes=bucket_bytes,
        partition_grad_bytes=partition_grad_bytes, in_partition=in_partition,
    )

    if stage == 1:
        # Stage 1 reduces only at the accumulation boundary, after backward (engine
        # ``allreduce_gradients`` -> ``reduce_gradients``): autograd's gradients live until then
        # and are taken in the parameters' order, each copied into the bucket.
        timeline.insert(spans[0].first_grad, bucket_bytes, OTHER)
        reduce(trainable, bucket_fills(trace, trainable, bucket_numel), position=lambda i: optimizer_pos,
               epilogue=optimizer_pos, first=True, free_grads=True)
    else:
        # Stage 2: each gradient is copied into the bucket by its hook and autograd's tensor
        # released (``reduce_independent_p_g_buckets_and_remove_grads``); a full bucket is
        # reduced at the hook that overflows it, the rest at the end of every micro-batch
        # (``independent_gradient_partition_epilogue``).
        arrival = spans[0].grad_position
        hooked = sorted((i for i in trainable if i in arrival), key=lambda i: arrival[i])
        fills = bucket_fills(trace, hooked, bucket_numel)
        for micro, span in enumerate(spans):
            timeline.insert(span.first_grad, bucket_bytes, OTHER)
            reduce(hooked, fills, position=lambda i, span=span: span.grad_position.get(i, span.backward_end),
                   epilogue=span.backward_end, first=micro == 0, free_grads=micro == 0)
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
        host_bytes = _host_bytes_stage12(trace, layout, slice_numel, itemsize, state_bytes, trainable)
        return RankPlan(timeline=timeline, host_bytes=host_bytes)
    return RankPlan(timeline=timeline)


def _replay_reductions(
    timeline, trace, order, fills, *, position, epilogue, first, free_grads, itemsize, bucket_bytes,
    partition_grad_bytes, in_partition,
) -> None:
    """The gradients of one backward arriving in ``order``, reduced bucket by bucket.

    A reduction (``reduce_ipg_grads`` -> ``average_tensor`` -> ``allreduce_and_scatter`` ->
    ``allreduce_bucket``) flattens what the bucket holds into a new tensor, casts it to the
    communication dtype when that differs, all-reduces it and copies it back; the gradients of
    this rank's slice are then copied into ``grads_in_partition``, allocated at the first such
    copy (``copy_grads_in_partition``; on later micro-batches the epilogue adds a new one into
    it, ``independent_gradient_partition_epilogue``). The epilogue releases the buckets."""
    triggered = {fill.trigger: fill for fill in fills if fill.trigger is not None}
    oversized = {fill.params[0] for fill in fills if fill.oversized}
    allocated = not first

    def run(fill: BucketFill, at: int) -> None:
        nonlocal allocated
        chunk = sum(trace.params[i].numel for i in fill.params)
        timeline.insert(at, chunk * itemsize, OTHER)
        if fill.comm_size != itemsize:
            timeline.insert(at, chunk * fill.comm_size, OTHER)
            timeline.insert(at, -chunk * fill.comm_size, OTHER)
        timeline.insert(at, -chunk * itemsize, OTHER)
        if not allocated and not in_partition.isdisjoint(fill.params):
            timeline.insert(at, partition_grad_bytes, GRADIENT)
            allocated = True
        if free_grads and fill.oversized:
            timeline.free_at(trace.params[fill.params[0]].grad_storage, at)

    for i in order:
        at = position(i)
        if i in triggered:
            run(triggered[i], at)
        if free_grads and i not in oversized:
            timeline.free_at(trace.params[i].grad_storage, at)
    for fill in fills:
        if fill.trigger is None:
            run(fill, epilogue)
    if not first:
        timeline.insert(epilogue, partition_grad_bytes, GRADIENT)
        timeline.insert(epilogue, -partition_grad_bytes, GRADIENT)
    timeline.insert(epilogue, -bucket_bytes, OTHER)


def _host_bytes_stage12(trace, layout, slice_numel, itemsize, state_bytes, trainable) -> int:
    """Pinned host memory per node with offload_optimizer (stage_1_and_2.py __init__ and
    ``initialize_optimizer_states``): fp32 master slice, its fp32 gradient, the flat optimizer
    state, a parameter-dtype copy of the slice (``param_buffer_of_bit16_for_cpu_offload_groups``),
    a staging buffer as large as the largest parameter (``temp_grad_buffer_for_cpu_offload``),
    and at stage 2 with gradient accumulation the per-parameter accumulators
    (``async_accumulate_grad_in_cpu_via_gpu``)."""
    largest = max(trace.params[i].numel for i in trainable)
    per_rank = slice_numel * FP32_BYTES * 2 + state_bytes + slice_numel * itemsize + largest * itemsize
    if layout.grad_accum > 1 and layout.strategy == "zero2":
        # stage 1 reduces once, at the boundary: nothing to accumulate on the host (measured)
        per_rank += overlapping_numel(trace, layout.world_size, layout.rank) * itemsize
    return per_rank * layout.ranks_per_node
