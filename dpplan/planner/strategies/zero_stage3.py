"""zero3: DeepSpeed ZeRO stage 3 (deepspeed/runtime/zero/stage3.py DeepSpeedZeroOptimizer_Stage3,
partition_parameters.py, partitioned_param_coordinator.py, parameter_offload.py).

Per rank: a 1/N shard of every parameter (``ds_tensor``, ``ceil(numel / N)`` elements,
partition_parameters.py ``_partition_param``); parameters of at most
``stage3_param_persistence_threshold`` elements are persistent: gathered once and never
released (parameter_offload.py ``mark_persistent_parameters``); other parameters are gathered
whole when a module runs and released afterwards unless reused soon (the coordinator below).
The optimizer steps fp32 master shards (``fp32_partitioned_groups_flat``); gradients go
through one bucket per communication dtype and are reduce-scattered into a flat partition
buffer (``_setup_for_real_optimizer``: ``ipg_buckets``, ``grad_partitions_flat_buffer``).

Granularity: the trace marks units (the planned wrap modules) and the root, not every module,
so gathering is modeled per unit: a unit's parameters are fetched when it starts and checked
for release when it ends; the root's own parameters (embeddings, head) are held for the whole
micro-batch.
"""

from __future__ import annotations

from collections import defaultdict, deque

from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import RankPlan
from dpplan.planner.strategies.zero_common import (
    FP32_BYTES,
    bucket_fills,
    comm_groups,
    flat_state_bytes,
    flat_step_temporaries,
    zero_optimizer_state,
)
from dpplan.planner.strategies.zero_settings import ZeroSettings
from dpplan.planner.timeline import RankTimeline, ceil_div
from dpplan.planner.trace import GRADIENT, OPTIMIZER_STATE, OTHER, PARAMETER, MicroBatchSpan, StepTrace, trace_index


def plan_stage3(trace: StepTrace, layout: Layout) -> RankPlan:
    world = layout.world_size
    timeline = RankTimeline(trace)
    offload_optimizer = layout.offload in ("optimizer", "optimizer+params")
    offload_params = layout.offload == "optimizer+params"
    params = trace.params
    zero = layout.zero
    shard = [ceil_div(p.numel, world) for p in params]
    persistent = [p.numel <= zero.param_persistence_threshold for p in params]

    for i, param in enumerate(params):
        if persistent[i]:
            # The whole copy stays (traced); its shard exists beside it (on the host with offload_param).
            if not offload_params:
                timeline.insert(0, shard[i] * param.itemsize, PARAMETER)
        else:
            timeline.scale(param.storage, 0.0 if offload_params else shard[i] / param.numel)

    trainable = [i for i, p in enumerate(params) if p.grad_storage >= 0]
    if not trainable:
        return RankPlan(timeline=timeline)
    itemsize = params[trainable[0]].itemsize
    shard_numel = sum(shard[i] for i in trainable)
    zero_optimizer_state(timeline)
    master_bytes = shard_numel * FP32_BYTES
    sub_groups = sub_group_numels([shard[i] for i in trainable], zero.sub_group_size)
    # one flat fp32 master and one optimizer state per sub-group (``fp32_partitioned_groups_flat``)
    state_bytes = sum(flat_state_bytes(trace.settings.optimizer, numel) for numel in sub_groups)
    grad_partition_bytes = shard_numel * itemsize  # gradient_accumulation_dtype: the parameters' dtype
    groups = comm_groups(trace, trainable)
    # Bucket buffers exist from __init__ on, in the communication dtype (not doubled by overlap_comm).
    timeline.insert(0, sum(zero.reduce_bucket_size * size for _, size in groups), OTHER)
    if offload_optimizer:
        # the step runs on the host: its temporaries count on a CPU run only
        flat_step_temporaries(timeline, max(sub_groups) if layout.device_type == "cpu" else 0)
    else:
        timeline.insert(0, master_bytes + state_bytes, OPTIMIZER_STATE)
        timeline.insert(0, grad_partition_bytes, GRADIENT)
        flat_step_temporaries(timeline, max(sub_groups))

    unit_numel: dict[int, int] = defaultdict(int)
    for p in params:
        unit_numel[p.unit] += p.numel
    largest_unit = max(unit_numel.values())
    notes: tuple[str, ...] = ()
    if min(zero.max_live_parameters, zero.max_reuse_distance) < largest_unit:
        # DeepSpeed gathers and releases module by module; the trace marks layers only.
        notes = (
            f"zero3: stage3_max_live_parameters / stage3_max_reuse_distance below one layer's "
            f"{largest_unit:,} parameters are planned layer by layer: an overestimate",
        )
    spans = trace_index(trace).micro_batches
    # Each gradient is copied into its bucket by the hook and autograd's tensor dropped
    # (``reduce_independent_p_g_buckets_and_remove_grads``), but for a gradient larger than the
    # bucket, kept until its own reduction. A hook that would overflow the bucket first
    # reduce-scatters what it holds (``__reduce_and_partition_ipg_grads``); the rest is reduced
    # at the end of backward. reduce_scatter_coalesced (deepspeed/runtime/comm/
    # coalesced_collectives.py) concatenates the bucket's partitions, each padded to a multiple
    # of the world size, into one new tensor.
    arrival = spans[0].grad_position
    hooked = sorted((i for i in trainable if i in arrival), key=lambda i: arrival[i])
    fills = bucket_fills(trace, hooked, zero.reduce_bucket_size)
    triggered = {fill.trigger: fill for fill in fills if fill.trigger is not None}
    oversized = {fill.params[0] for fill in fills if fill.oversized}
    for index, span in enumerate(spans):
        def reduce_scatter(fill, at, index=index):
            padded = sum(ceil_div(params[i].numel, world) * world for i in fill.params)
            timeline.insert(at, padded * fill.comm_size, OTHER)
            timeline.insert(at, -padded * fill.comm_size, OTHER)
            if index == 0 and fill.oversized:
                timeline.free_at(params[fill.params[0]].grad_storage, at)

        for i in hooked:
            at = span.grad_position.get(i, span.backward_end)
            if i in triggered:
                reduce_scatter(triggered[i], at)
            if index == 0 and i not in oversized:
                timeline.free_at(params[i].grad_storage, at)
        for fill in fills:
            if fill.trigger is None:
                reduce_scatter(fill, span.backward_end)
        _gather_params(timeline, trace, span, persistent, zero, world)

    optimizer_pos, end_pos = trace_index(trace).optimizer, trace_index(trace).end
    # step() starts by releasing every gathered parameter, the persistent ones too
    # (``_partition_all_parameters``), and gathers the persistent ones again when it ends
    # (``_post_step``: one coalesced all-gather, its flat buffer beside them for a moment).
    kept = [i for i, p in enumerate(params) if persistent[i]]
    kept_bytes = sum(params[i].numel * params[i].itemsize for i in kept)
    kept_flat = sum(ceil_div(params[i].numel, world) * world * params[i].itemsize for i in kept)
    timeline.insert(optimizer_pos, -kept_bytes, PARAMETER)
    if not offload_optimizer:
        # ``_prepare_fp32_grad_for_sub_group``: the partition gradients flattened, cast to fp32,
        # set as the master's .grad and dropped after the sub-group's step.
        # The gradient norm first (``get_grad_norm_direct``): each partition gradient copied
        # to fp64 in turn.
        norm_bytes = max(shard[i] for i in trainable) * 8
        timeline.insert(optimizer_pos, norm_bytes, OTHER)
        timeline.insert(optimizer_pos, -norm_bytes, OTHER)
        # Sub-group by sub-group (``step``: ``_prepare_sub_group`` ... ``_release_sub_group``):
        # the flattened fp32 gradient of one sub-group at a time; the last one's is dropped when
        # the step ends.
        for number, numel in enumerate(sub_groups):
            timeline.insert(optimizer_pos, numel * itemsize, GRADIENT)
            if itemsize != FP32_BYTES:
                timeline.insert(optimizer_pos, numel * FP32_BYTES, GRADIENT)
                timeline.insert(optimizer_pos, -numel * itemsize, GRADIENT)
            last = number == len(sub_groups) - 1
            timeline.insert(end_pos if last else optimizer_pos, -numel * FP32_BYTES, GRADIENT)
    timeline.insert(end_pos, kept_flat, PARAMETER)
    timeline.insert(end_pos, kept_bytes, PARAMETER)
    timeline.insert(end_pos, -kept_flat, PARAMETER)
    host_bytes = None
    if offload_optimizer:
        # Host: fp32 master shards, their optimizer state, the partition-gradient buffer
        # (``grad_partitions_flat_buffer`` on ``self.device`` = cpu) and the fp32 gradient
        # buffer ``initialize_optimizer_states`` keeps as the master's .grad when offloading.
        per_rank = master_bytes * 2 + state_bytes + grad_partition_bytes
        if offload_params:
            per_rank += sum(shard[i] * p.itemsize for i, p in enumerate(params))
        host_bytes = per_rank * layout.ranks_per_node
    return RankPlan(timeline=timeline, notes=notes, host_bytes=host_bytes)


def sub_group_numels(shards: list[int], sub_group_size: int) -> list[int]:
    """Elements of each optimizer sub-group of this rank's shards, in parameter order
    (stage3.py ``_create_fp16_sub_groups``: parameters are added until a group reaches
    ``sub_group_size``)."""
    total = sum(shards)
    if sub_group_size >= total:
        return [total]
    groups, current = [], 0
    for numel in shards:
        current += numel
        if current >= sub_group_size:
            groups.append(current)
            current = 0
    if current:
        groups.append(current)
    return groups


def _gather_params(
    timeline: RankTimeline, trace: StepTrace, span: MicroBatchSpan, persistent: list[bool], zero: ZeroSettings,
    world: int,
) -> None:
    """Replay the PartitionedParameterCoordinator over one micro-batch's units (steady state:
    the module trace is complete).

    ``fetch_sub_module``: gather the unit's parameters, then prefetch the next ones in trace
    order until ``stage3_prefetch_bucket_size`` elements are in flight (fewer if
    ``stage3_max_live_parameters`` would be exceeded); parameters already available are
    skipped but remembered as needed until their later use. ``release_sub_module`` /
    ``__params_to_release``: a parameter stays gathered if it is used again before
    ``stage3_max_reuse_distance`` elements of other modules' parameters have been traversed.
    """
    params = trace.params
    root = len(trace.unit_names) - 1
    unit_params: dict[int, list[int]] = defaultdict(list)
    for i, param in enumerate(params):
        unit_params[param.unit].append(i)
    unit_numel = {u: sum(params[i].numel for i in ps) for u, ps in unit_params.items()}

    forward = sorted((pos, u) for u, pos in span.fwd_start.items() if u != root and u in span.fwd_end)
    steps = [(u, pos, span.fwd_end[u]) for pos, u in forward]
    backward = []
    for u, end in span.bwd_end.items():
        if u == root:
            continue
        start = min(p for p in (span.bwd_start.get(u), span.recompute_start.get(u)) if p is not None) \
            if (u in span.bwd_start or u in span.recompute_start) else end
        backward.append((start, u, end))
    steps += [(u, start, end) for start, u, end in sorted(backward)]
    # Traversal order for reuse distances: the root's own modules run between the last
    # forward unit and the first backward unit (head) -- counted once there.
    traversal = [u for u, _, _ in steps]
    split = len(forward)
    traversal_numel = [unit_numel.get(u, 0) for u in traversal]
    traversal_numel.insert(split, unit_numel.get(root, 0))
    traversal_units = traversal[:split] + [root] + traversal[split:]

    available: set[int] = set()
    n_available = 0

    def fetch(i: int, position: int) -> None:
        nonlocal n_available
        available.add(i)
        n_available += params[i].numel
        timeline.insert(position, params[i].numel * params[i].itemsize, PARAMETER)

    def release(i: int, position: int) -> None:
        nonlocal n_available
        available.discard(i)
        n_available -= params[i].numel
        timeline.insert(position, -params[i].numel * params[i].itemsize, PARAMETER)

    gathered = [i for i in unit_params.get(root, []) if not persistent[i]]
    for i in gathered:
        fetch(i, span.start)

    def flat_buffer(ids: list[int]) -> int:
        # allgather_coalesced (partition_parameters.py ``_all_gather_dtype``): one flat tensor of
        # every partition of the parameters it gathers, held by the handle until the last of
        # them is waited for; the parameters themselves are new tensors cat'ed out of it.
        return sum(ceil_div(params[i].numel, world) * world * params[i].itemsize for i in ids)

    queue = deque((i, t) for t, (u, _, _) in enumerate(steps) for i in unit_params.get(u, []) if not persistent[i])
    most_recent: dict[int, int] = defaultdict(lambda: -1)
    for t, (u, start, end) in enumerate(steps):
        own = [i for i in unit_params.get(u, []) if not persistent[i]]
        missing = [i for i in own if i not in available]
        if missing:
            timeline.insert(start, flat_buffer(missing), PARAMETER)
            for i in missing:
                fetch(i, start)
            timeline.insert(start, -flat_buffer(missing), PARAMETER)
        while queue and queue[0][1] <= t:
            i, step = queue.popleft()
            most_recent[i] = max(most_recent[i], step)
        budget = min(zero.max_live_parameters - n_available, zero.prefetch_bucket_size)
        prefetched, fetched, last_step = 0, [], t
        while queue and prefetched < budget:
            i, step = queue.popleft()
            most_recent[i] = max(most_recent[i], step)
            if i not in available:
                fetch(i, start)
                prefetched += params[i].numel
                fetched.append(i)
                last_step = max(last_step, step)
        if fetched:
            # The prefetch's buffer lives until its last parameter is waited for: by a module
            # late in the last unit it serves (planned as that unit's end: units are the
            # trace's granularity).
            timeline.insert(start, flat_buffer(fetched), PARAMETER)
            timeline.insert(steps[last_step][2], -flat_buffer(fetched), PARAMETER)
        here = t + (1 if t >= split else 0)  # index of this step in traversal_units
        for i in own:
            if i in available and most_recent[i] <= t and not _reused_soon(i, here, traversal_units,
                                                                            traversal_numel, params,
                                                                            zero.max_reuse_distance):
                release(i, end)
    for i in list(available):
        release(i, span.backward_end)


def _reused_soon(i: int, here: int, units: list[int], numels: list[int], params, max_reuse_distance: int) -> bool:
    target = params[i].unit
    traversed = 0
    for k in range(here + 1, len(units)):
        if traversed >= max_reuse_distance:
            return False
        if units[k] == target:
            return True
        traversed += numels[k]
    return False
