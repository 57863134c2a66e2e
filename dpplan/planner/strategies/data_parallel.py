"""dp: torch.nn.DataParallel. One process drives every GPU; device 0 is the busiest.

What device 0 holds beyond the traced step of one replica at the micro-batch b:
  - the whole input batch, b x GPUs: the user's batch lives on device 0 and ``scatter`` hands
    device 0 its chunk as a view (torch/nn/parallel/scatter_gather.py ``scatter`` ->
    comm.scatter, which copies only to other devices);
  - replica 0 is the module itself: ``replicate`` broadcasts with
    ``comm.broadcast_coalesced``, whose first device keeps the source tensors
    (torch/nn/parallel/replicate.py, comm.py), so no parameter copy;
  - the outputs of all replicas gathered onto device 0 (``gather`` -> ``Gather`` ->
    comm.gather, a new tensor GPUs x the replica's output), and whatever the loss computes on
    them outside the model, also GPUs x larger;
  - at the end of backward the gradient reduction onto device 0: ``Broadcast.backward`` ->
    ``ReduceAddCoalesced`` -> comm.reduce_add_coalesced, which runs once every replica's
    gradients are ready (one autograd node for all parameters). It flattens each ~10 MiB chunk
    of device 0's gradients (``_flatten_dense_tensors``), reduces into a new flat result
    (``reduce_add``: ``torch.empty_like`` + NCCL reduce) and returns views of the results,
    while replica 0's gradients still sit in the node's input buffer: one more copy of every
    gradient, plus two chunk copies, until the node returns.
Parameters, gradients and optimizer state are the single-GPU ones (the optimizer steps the
module on device 0). On device_type "cpu" DataParallel is a plain call (no GPUs): ``single``.
"""

from __future__ import annotations

import numpy as np

from dpplan.planner.gpu_overheads import ProcessGroup
from dpplan.planner.strategies.common import wraps_every_model
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import RankPlan
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import ACTIVATION, GRADIENT, INPUT, TEMPORARY, StepTrace, trace_index

REDUCE_ADD_BUFFER_BYTES = 10485760
"""comm.reduce_add_coalesced ``buffer_size`` default: gradients are coalesced in chunks of
at most this many bytes (a larger tensor is a chunk of its own, ``_take_tensors``)."""


refusal = wraps_every_model


def plan_rank(trace: StepTrace, layout: Layout) -> RankPlan:
    timeline = RankTimeline(trace)
    gpus = layout.world_size
    if layout.device_type == "cpu" or gpus == 1:
        return RankPlan(timeline=timeline)
    # The whole batch on device 0.
    for batch_storage in np.nonzero((trace.storage_category == INPUT) & (trace.storage_batch_degree > 0))[0]:
        timeline.scale(int(batch_storage), gpus)
    # Gathered outputs and the loss computed on them.
    for storage in gathered_storages(trace):
        timeline.scale(storage, gpus)
    # The reduction onto device 0 at the end of every micro-batch's backward.
    reduce_bytes = gradient_reduction_bytes(trace)
    for position in trace_index(trace).root_backward_ends:
        timeline.insert(position, reduce_bytes, GRADIENT)
        timeline.insert(position, -reduce_bytes, GRADIENT)
    return RankPlan(
        timeline=timeline,
        notes=("dp: device 0 holds the whole input batch, the gathered outputs and the gradient reduction",),
    )


def ranks_to_evaluate(trace: StepTrace, layout: Layout) -> list[int]:
    return [0]


def process_groups(layout: Layout) -> list[ProcessGroup]:
    """One process, no process group: DataParallel uses NCCL collectives without a communicator
    group of ranks (torch.cuda.nccl)."""
    return []


def gathered_storages(trace: StepTrace) -> list[int]:
    """Storages that exist once per gathered batch on device 0, per micro-batch: the model's
    output (the last storage a module created that is still alive when the model returns, if
    it has a batch dimension; a loss computed inside the model is a scalar per replica) and the
    batch-sized storages the loss creates outside any module before backward.
    A heuristic: the trace marks where backward starts, not where the model returns."""
    result: list[int] = []
    index = trace_index(trace)
    starts = [span.start for span in index.micro_batches]
    backwards = index.backward_starts
    for start, backward in zip(starts, backwards):
        storages = trace.event_storage[start:backward]
        signs = trace.event_sign[start:backward]
        born = storages[signs > 0]
        outside = [
            int(s) for s in born
            if trace.storage_module[s] < 0 and trace.storage_category[s] in (ACTIVATION, TEMPORARY)
            and trace.storage_batch_degree[s] > 0
        ]
        # The model returns before the first storage born outside any module.
        first_outside = next(
            (k for k in range(len(storages)) if signs[k] > 0 and int(storages[k]) in set(outside)), len(storages)
        )
        alive: dict[int, bool] = {}
        for k in range(first_outside):
            alive[int(storages[k])] = signs[k] > 0
        inside = [s for s, live in alive.items() if live and trace.storage_module[s] >= 0]
        if inside and trace.storage_batch_degree[inside[-1]] > 0:
            result.append(inside[-1])
        result.extend(outside)
    return sorted(set(result))


def gradient_reduction_bytes(trace: StepTrace) -> int:
    """Peak extra bytes of ``reduce_add_coalesced`` on device 0 for one reduction.

    Per chunk: device 0's gradients flattened (a view when the chunk is one tensor,
    torch/csrc/utils/tensor_flatten.h ``flatten_dense_tensors``), built while the previous
    chunk's list is still bound, then the chunk's result; results accumulate until the node
    returns."""
    grads = [p.numel * p.itemsize for p in trace.params if p.grad_storage >= 0]
    chunks: list[tuple[int, int]] = []  # (bytes, tensors)
    current = count = 0
    for nbytes in grads:
        if current and current + nbytes > REDUCE_ADD_BUFFER_BYTES:
            chunks.append((current, count))
            current = count = 0
        current += nbytes
        count += 1
    if current:
        chunks.append((current, count))
    peak = done = previous_flat = 0
    for nbytes, count in chunks:
        flat = nbytes if count > 1 else 0
        peak = max(peak, done + previous_flat + flat, done + flat + nbytes)
        done += nbytes
        previous_flat = flat
    return peak
