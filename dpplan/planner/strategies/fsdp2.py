"""fsdp2: ``fully_shard`` on each unit, then on the root (torch FSDP2, reshard after forward).

What one rank holds (torch/distributed/fsdp/_fully_shard/, FSDP_SRC):
  - every parameter as its dim-0 shard, padded to the size of chunk 0 on every rank, in the
    original dtype (fp32 under mixed precision); the optimizer, its state and the sharded
    gradients see only the rank's unpadded rows (so rank 0 holds the most);
  - per unit, in forward: an all-gather output buffer (all ranks' padded shards, in the
    compute dtype), then the unsharded parameters copied out of it; the unsharded parameters
    are freed after the unit's forward, the buffer only at the next unit's pre-forward;
  - in backward: the same all-gather, prefetched one unit ahead; after the unit's backward
    its unsharded gradients are copied into a reduce-scatter input (fp32 under mixed
    precision) and freed, and reduced into a flat sharded-gradient buffer that lives until
    ``zero_grad``; the reduce-scatter input is kept until the next unit's reduce-scatter.
The root unit is not resharded after forward. Without gradient sync (all micro-batches but
the last) the unsharded gradients stay, moved to fp32 under mixed precision.

Modules: fsdp2_buffers.py (the buffers and collectives), fsdp2_hooks.py (when FSDP2's hooks
run them over the traced step), fsdp2_pipeline.py (the same hooks as a pipeline stage drives
them: unsharded all step, reduce-scatter after the last backward). This module sizes the shards and the resident state.

device "cpu" plans a gloo run: gloo's collectives add temporaries as large as their buffers
and CPU's ``cat`` stages dtype casts (measured on torch 2.13, see fsdp2_buffers.py); "cuda"
(NCCL) has the same FSDP2 buffers without them: NCCL reduces in place with AVG for fp32/bf16
(_get_gradient_divide_factors) and ``_chunk_cat`` casts in its CUDA kernel.
"""

from __future__ import annotations

import numpy as np

from dpplan.planner.gpu_overheads import ProcessGroup
from dpplan.planner.strategies.common import (
    mesh_process_groups,
    owned_storages,
    resize_owned_storages,
    scalar_parameter,
    storages_by_param,
)
from dpplan.planner.strategies.fsdp2_buffers import (
    Replay,
    Schedule,
    ShardedParam,
    param_groups,
    storage_lifetimes,
)
from dpplan.planner.strategies.fsdp2_hooks import replay_step
from dpplan.planner.strategies.fsdp2_pipeline import replay_pipeline_step
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import RankPlan
from dpplan.planner.timeline import RankTimeline, ceil_div
from dpplan.planner.trace import OTHER, PARAM_CAST, StepTrace, trace_index
from dpplan.training.expert_parallel import expert_shard_dim

MIXED = ("bf16-mixed", "fp16-mixed")
RANK_MAP_ITEMSIZE = 4
"""torch/distributed/device_mesh.py ``init_device_mesh``: ``torch.arange(numel, dtype=torch.int)``
on the CPU, the mesh's rank map."""
REDUCE_ITEMSIZE_MIXED = 4
"""profiler/parallelize.py builds MixedPrecisionPolicy(param_dtype=low, reduce_dtype=float32)."""


def shard_numels(shape: tuple[int, ...], numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """(padded, local) elements of one rank's shard.

    ``FSDPParam._init_sharded_param`` (FSDP_SRC/_fsdp_param.py): ``torch.chunk`` along dim 0,
    so chunks hold ceil(d0 / world) rows and the last ranks may get fewer or none; every rank
    stores a buffer the size of chunk 0 ("0th always padded"), and its ``sharded_param`` is
    the unpadded narrow view of it.
    """
    if numel == 0:
        return 0, 0
    rows = shape[0] if shape else 1
    per_row = numel // rows
    chunk = ceil_div(rows, world_size)
    local_rows = max(0, min(chunk, rows - rank * chunk))
    return chunk * per_row, local_rows * per_row


def _params(trace: StepTrace, layout: Layout) -> list[ShardedParam]:
    mixed = trace.settings.family == PARAM_CAST and layout.precision in MIXED
    result = []
    for i, info in enumerate(trace.params):
        shard_dim = 0
        if info.unit in trace.expert_units:  # over the ranks holding the same experts
            shard_dim = expert_shard_dim(info.shape, layout.expert_shard_size)
            if shard_dim:  # even (expert_shard_dim checked): no padding
                padded = local = info.numel // layout.expert_shard_size
            else:
                padded, local = shard_numels(info.shape, info.numel, layout.expert_shard_size, layout.expert_shard_rank)
        else:
            padded, local = shard_numels(info.shape, info.numel, layout.dp_shard_size, layout.dp_shard_rank)
        # Under bf16/fp16-mixed the trace holds the parameters in the low dtype; FSDP2 keeps
        # them (and reduces gradients) in fp32 and casts only the all-gather input
        # (FSDPParam.init_dtype_attrs, _get_param_all_gather_inputs).
        low = mixed and info.itemsize == 2
        result.append(
            ShardedParam(
                index=i,
                numel=info.numel,
                padded=padded,
                local=local,
                compute_size=info.itemsize,
                orig_size=4 if low else info.itemsize,
                reduce_size=REDUCE_ITEMSIZE_MIXED if low else info.itemsize,
                trainable=info.grad_storage >= 0,
                shard_dim=shard_dim,
            )
        )
    return result


PADDING_NOTE_SHARE = 0.05
"""Name the padding when it adds this share of the parameters' bytes or more."""


def _padding_notes(trace: StepTrace, layout: Layout, params: list[ShardedParam]) -> list[str]:
    """Where dim-0 sharding pads a lot: a parameter with fewer rows than its ranks (stacked
    experts, small tables) is stored as one row per rank on every rank."""
    total = sum(p.numel * p.orig_size for p in params)
    padded = sum(p.padded * p.orig_size for p in params)
    ideal = sum(ceil_div(p.numel, _shard_ranks(trace, layout, p)) * p.orig_size for p in params)
    if not total or padded - ideal < PADDING_NOTE_SHARE * ideal:
        return []
    worst = max(params, key=lambda p: (p.padded - ceil_div(p.numel, _shard_ranks(trace, layout, p))) * p.orig_size)
    info = trace.params[worst.index]
    ranks = _shard_ranks(trace, layout, worst)
    return [f"fsdp2 shards dim 0: {info.name} {list(info.shape)} has fewer rows than its {ranks} shard ranks, so each "
            f"rank stores a whole row; padding adds {100 * (padded - ideal) / ideal:.0f}% to the sharded parameters "
            "(and to their gradients and the most loaded rank's optimizer state; --ep splits stacked experts "
            "over ranks, and shards them on dim 1 where a rank holds fewer than its shard ranks, as torchtitan does)"]


def _shard_ranks(trace: StepTrace, layout: Layout, p: ShardedParam) -> int:
    unit = trace.params[p.index].unit
    return layout.expert_shard_size if unit in trace.expert_units else layout.dp_shard_size


def _offload(layout: Layout) -> tuple[bool, list[str]]:
    if layout.offload == "none":
        return False, []
    if layout.device_type == "cpu":
        return False, ["offload: on a CPU run every byte is host memory already; planned without offload"]
    notes = []
    if layout.offload == "optimizer":
        notes.append(
            "offload: FSDP2 has no optimizer-only offload; its CPUOffloadPolicy moves parameters, "
            "gradients and the optimizer step to the host together, planned as optimizer+params"
        )
    return True, notes


def _shard_resident(timeline: RankTimeline, params: list[ShardedParam], offload: bool) -> None:
    """Sharded parameters (padded, original dtype) and optimizer state / step temporaries on
    the rank's unpadded shard (the optimizer runs on the DTensor ``sharded_param``, a narrow
    view of the padded buffer: FSDPParam._init_sharded_param). With CPU offload both live on
    the host (CPUOffloadPolicy: "the optimizer step runs on CPU")."""
    trace = timeline.trace
    count = len(trace.params)
    padded, local, compute, orig = (np.zeros(count, dtype=np.int64) for _ in range(4))
    for p in params:
        padded[p.index], local[p.index], compute[p.index], orig[p.index] = p.padded, p.local, p.compute_size, p.orig_size
    parameters = owned_storages(trace, "parameter")
    traced = parameters.numel * compute[parameters.owner]
    kept = (traced != 0) & (not offload)
    factors = np.zeros(len(parameters.storage))
    factors[kept] = (padded * orig)[parameters.owner[kept]] / traced[kept]
    timeline.scale_many(parameters.storage, factors)
    for category in ("optimizer_state", "optimizer_temporary"):
        step = owned_storages(trace, category)
        if offload:
            timeline.scale_many(step.storage, np.zeros(len(step.storage)))
        else:
            resize_owned_storages(timeline, step, local, np.where(orig != compute, orig, 0))


def _host_bytes(timeline: RankTimeline, params: list[ShardedParam], owned, layout: Layout) -> int:
    """Host RAM per node under CPUOffloadPolicy: per rank the padded fp32 parameter shards
    (pinned), the sharded gradients copied to the host, the optimizer state and the largest
    set of optimizer-step temporaries alive at once."""
    trace = timeline.trace
    sizes = trace.storage_bytes * timeline.storage_scale
    per_rank = sum(p.padded * p.orig_size + (p.local * p.orig_size if p.trainable else 0) for p in params)
    state = [s for p in params for s in owned[p.index].optimizer_state]
    per_rank += int(sum(sizes[s] for s in state))
    temporary = np.zeros(len(sizes), dtype=bool)
    temporary[[s for p in params for s in owned[p.index].optimizer_temporary]] = True
    events = temporary[trace.event_storage]
    if events.any():
        steps = trace.event_sign[events] * sizes[trace.event_storage[events]]
        per_rank += int(max(0.0, float(np.max(np.cumsum(steps)))))
    return per_rank * layout.ranks_per_node


def plan_rank(trace: StepTrace, layout: Layout) -> RankPlan:
    """One rank's step: resident shards resized, FSDP2's buffers replayed at its hooks."""
    timeline = RankTimeline(trace)
    offload, notes = _offload(layout)
    if trace.settings.optimizer == "adafactor" and layout.dp_shard_size > 1:
        # torch/optim/_adafactor.py updates its factored state in place (``pow_``) on the
        # DTensor gradients, which DTensor refuses for a Partial placement (measured: torch
        # 2.13 raises "in-place operations that require placement changes are not supported").
        notes.append("adafactor: torch's Adafactor fails on FSDP2's sharded (DTensor) parameters")
    params = _params(trace, layout)
    notes += _padding_notes(trace, layout, params)
    owned = storages_by_param(trace)
    _shard_resident(timeline, params, offload=False)
    pipeline = trace.settings.pp > 1
    if layout.device_type == "cpu" and layout.mesh.tp == 1 and layout.mesh.ep == 1 and not pipeline:
        # fully_shard without a mesh builds its own (FSDP_SRC/_fsdp_init.py
        # ``_init_default_mesh``) at each call: one per unit and one for the root, each holding
        # a world-size rank map in host memory, which on a CPU run is the memory measured
        # (a pipeline's stages are sharded over its dp mesh: profiler/pipeline_run.py).
        timeline.insert(0, len(trace.unit_names) * layout.world_size * RANK_MAP_ITEMSIZE, OTHER)
    host = _host_bytes(timeline, params, owned, layout) if offload else None
    if offload:
        _shard_resident(timeline, params, offload=True)
    birth, death = storage_lifetimes(trace)
    run = Replay(
        trace=trace,
        sched=Schedule(timeline=timeline),
        groups=param_groups(trace, params, layout.dp_shard_size, layout.expert_shard_size),
        grads=[ps.gradient for ps in owned],
        birth=birth,
        death=death,
        gloo=layout.device_type == "cpu" and layout.dp_shard_size > 1,
        cpu=layout.device_type == "cpu",
        offload=offload,
    )
    if pipeline:  # every micro-batch of the schedule is in the trace (strategies/fsdp2_pipeline.py)
        replay_pipeline_step(run)
        if layout.dp_shard_size == 1:
            # measured on 2 and 4 gloo ranks (pp 2 x dp 1, with and without tp 2): the last stage
            # 1.7 % above its real peak, one unit's unsharded parameters; dp >= 2 to 32 bytes
            notes.append("fsdp2 under a pipeline with one dp rank: planned up to 2 % above (one unit's unsharded "
                         "parameters at the last stage's final gradient accumulation, not yet found where FSDP2 "
                         "frees them)")
        return RankPlan(timeline=timeline, notes=tuple(notes), host_bytes=host)
    replay_step(run)
    traced = trace_index(trace).num_micro_batches
    if layout.grad_accum > traced >= 2:
        # Micro-batches 2..N-1 hold every unit's accumulated unsharded gradients through a
        # whole backward without reduce-scatter; the replay handles them once traced.
        notes.append(
            f"grad_accum {layout.grad_accum}: the middle micro-batches (no reduce-scatter, "
            "accumulated unsharded gradients held throughout) are planned like the last one"
        )
    return RankPlan(timeline=timeline, notes=tuple(notes), host_bytes=host)


def process_groups(layout: Layout) -> list[ProcessGroup]:
    """The mesh's communicators; with expert parallelism also the (edp, ep) mesh's two: the
    token exchange over ep (neighbouring ranks) and the experts units' over edp
    (profiler/expert_parallel_run.py builds them)."""
    groups = mesh_process_groups(layout)
    if layout.mesh.ep > 1:
        per_node = layout.ranks_per_node
        groups += [ProcessGroup(num_ranks=layout.mesh.ep, spans_nodes=layout.mesh.ep * layout.mesh.tp > per_node),
                   ProcessGroup(num_ranks=layout.expert_shard_size,
                                spans_nodes=layout.mesh.dp_shard * layout.mesh.tp > per_node)]
    return groups


def ranks_to_evaluate(trace: StepTrace, layout: Layout) -> list[int]:
    """Rank 0: every rank stores padded shards and same-size buffers, and rank 0 holds the
    most unpadded rows, so its optimizer state and step temporaries are the largest."""
    return [0]


def refusal(model) -> str | None:
    """What the real wrapper says when it refuses to wrap ``model`` (None: it wraps it): a 0-d
    parameter (torch/distributed/fsdp/_fully_shard/_fsdp_init.py ``_verify_managed_param``)."""
    name = scalar_parameter(model)
    if name is None:
        return None
    return (f"fully_shard doesn't support scalar parameters: {name} is 0-d "
            "(the wrapper asks to make it a 1-d tensor with one element)")
