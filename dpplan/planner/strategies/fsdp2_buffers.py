"""FSDP2's buffers and collectives for one rank, as memory events (see strategies/fsdp2.py).

Everything here is read from torch/distributed/fsdp/_fully_shard/ (FSDP_SRC): which tensors
``foreach_all_gather``, ``foreach_all_gather_copy_out``, ``FSDPParam.free_unsharded_param``
and ``foreach_reduce`` create and drop, in order. ``Replay`` carries what FSDP2's runtime
holds between hooks; ``Schedule`` turns the events into timeline inserts in program order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import GRADIENT, OTHER, PARAMETER, TEMPORARY, StepTrace

FSDP_SRC = "torch/distributed/fsdp/_fully_shard"

# Order of strategy events inside one marker position: FSDP's post-hooks of the unit that
# just finished run before the pre-hooks of the next one (post_backward of unit u is an
# autograd node that precedes the tensor hook that runs pre_backward of unit u-1).
POST, PRE = 0, 1

GLOO_WORK_LINGERS = False
"""Plan gloo's reduce-scatter copy as freed when the collective returns (False) or when
gloo's worker thread next runs (True); see ``_gloo_reduce_scatter``."""


@dataclass(kw_only=True)
class ShardedParam:
    index: int
    numel: int
    padded: int
    local: int
    compute_size: int
    """Bytes per element of the unsharded parameter and of the autograd gradient (as traced)."""
    orig_size: int
    """Bytes per element of the sharded parameter, its gradient and optimizer state."""
    reduce_size: int
    trainable: bool
    shard_dim: int = 0
    """The dim FSDP2 shards it on (1: an experts unit's weights, training/expert_parallel.py)."""


@dataclass(kw_only=True)
class ParamGroup:
    """One FSDPParamGroup: the parameters of one unit (FSDP_SRC/_fsdp_param_group.py). Its
    byte counts are computed once, after ``param_groups`` has filled ``params``."""

    unit: int
    params: list[ShardedParam]
    world_size: int
    divide_factor: bool = False
    """A custom gradient divide factor is set (an experts unit under expert parallelism:
    ``set_gradient_divide_factor(dp)``)."""

    def unsharded_bytes(self, p: ShardedParam) -> int:
        # init_all_gather_outputs: numel * world_size of the padded shard (_fsdp_param.py).
        return p.padded * self.world_size * p.compute_size

    @cached_property
    def all_gather_bytes(self) -> int:
        # foreach_all_gather: all_gather_input_numel * world_size (_fsdp_collectives.py).
        return sum(self.unsharded_bytes(p) for p in self.params)

    @cached_property
    def copy_in_bytes(self) -> int:
        # _get_param_all_gather_inputs: one flat buffer of the padded shards cast to the
        # param dtype, only when MixedPrecisionPolicy casts (use_foreach_copy).
        return sum(p.padded * p.compute_size for p in self.params if p.compute_size != p.orig_size)

    @cached_property
    def with_grad(self) -> list[ShardedParam]:
        return [p for p in self.params if p.trainable]

    @cached_property
    def reduce_input_bytes(self) -> int:
        # foreach_reduce: dim-0 padded unsharded numel, in the reduce dtype.
        return sum(p.padded * self.world_size * p.reduce_size for p in self.with_grad)

    @cached_property
    def reduce_output_bytes(self) -> int:
        return sum(p.padded * p.reduce_size for p in self.with_grad)

    @cached_property
    def sharded_grad_bytes(self) -> int:
        # _to_dtype_if_needed(reduce_output, orig_dtype): the sharded gradients are views of
        # this flat buffer (torch.as_strided in foreach_reduce).
        return sum(p.padded * p.orig_size for p in self.with_grad)


def param_groups(trace: StepTrace, params: list[ShardedParam], world_size: int,
                 expert_world_size: int = 1) -> dict[int, ParamGroup]:
    """Units that own parameters; a unit without any gets no FSDPParamGroup and does nothing
    (FSDPState._fsdp_param_groups is empty, _fully_shard.py ``fully_shard``). Experts units
    (``trace.expert_units``) shard over ``expert_world_size`` ranks."""
    groups: dict[int, ParamGroup] = {}
    for p in params:
        unit = trace.params[p.index].unit
        expert = unit in trace.expert_units
        group = ParamGroup(unit=unit, params=[], world_size=expert_world_size if expert else world_size,
                           divide_factor=expert)
        groups.setdefault(unit, group).params.append(p)
    return groups


def storage_lifetimes(trace: StepTrace) -> tuple[np.ndarray, np.ndarray]:
    """Event index of each storage's birth and death (len(events) when it outlives the step)."""
    count = len(trace.storage_bytes)
    events = np.arange(len(trace.event_storage))
    birth = np.full(count, -1, dtype=np.int64)
    death = np.full(count, len(events), dtype=np.int64)
    born = trace.event_sign > 0
    birth[trace.event_storage[born]] = events[born]
    death[trace.event_storage[~born]] = events[~born]
    return birth, death


@dataclass(kw_only=True)
class Schedule:
    """Strategy events, replayed onto the timeline ordered by (position, stage, call order)."""

    timeline: RankTimeline
    items: list[tuple[int, int, int, str, int, int]] = field(default_factory=list)

    def alloc(self, position: int, stage: int, nbytes: int, category: int) -> None:
        if nbytes:
            self.items.append((position, stage, len(self.items), "insert", nbytes, category))

    def free(self, position: int, stage: int, nbytes: int, category: int) -> None:
        self.alloc(position, stage, -nbytes, category)

    def kill(self, position: int, stage: int, storage: int) -> None:
        self.items.append((position, stage, len(self.items), "free_at", storage, 0))

    def apply(self) -> None:
        self.timeline.apply_in_order(
            [(position, what == "insert", a, b) for position, _, _, what, a, b in sorted(self.items)]
        )


@dataclass(kw_only=True)
class Replay:
    """What FSDP2's runtime holds between hooks while the step is replayed."""

    trace: StepTrace
    sched: Schedule
    groups: dict[int, ParamGroup]
    grads: list[list[int]]
    """Traced gradient storages of each parameter."""
    birth: np.ndarray
    death: np.ndarray
    gloo: bool
    cpu: bool
    offload: bool
    all_gather_pending: int = 0
    """FSDPCommContext.all_gather_state: the last forward all-gather output, freed at the next
    unit's wait_for_unshard or at the root's post-forward."""
    reduce_scatter_pending: int = 0
    """FSDPCommContext.reduce_scatter_states (max_input_buffers=1): the last reduce-scatter
    input, freed at the next post_backward's rs_wait or the root's final callback."""
    gloo_lingering: int = 0
    """Bytes of a finished gloo work not yet released by its worker thread."""
    prefetched: set[int] = field(default_factory=set)
    unsharded: set[int] = field(default_factory=set)
    post_forward_order: list[int] = field(default_factory=list)
    accumulated: dict[int, int] = field(default_factory=dict)
    """Parameter -> bytes of its fp32 unsharded_accumulated_grad (mixed precision, no sync)."""
    killed: set[int] = field(default_factory=set)
    sharded_grads: dict[int, int] = field(default_factory=dict)
    """Unit -> bytes of its flat sharded-gradient buffer (alive until zero_grad)."""

    def kill(self, position: int, stage: int, storage: int) -> None:
        if storage not in self.killed:
            self.killed.add(storage)
            self.sched.kill(position, stage, storage)

    def alive_grads(self, p: ShardedParam, position: int) -> list[int]:
        return [
            s for s in self.grads[p.index]
            if s not in self.killed and self.birth[s] < position <= self.death[s]
        ]


def all_gather(run: Replay, g: ParamGroup, pos: int, stage: int) -> None:
    """FSDPParamGroup.unshard -> foreach_all_gather (_fsdp_collectives.py)."""
    if g.world_size == 1 or g.unit in run.unsharded:
        return  # unshard() is a no-op, or records an empty AllGatherResult (one rank)
    inputs: list[int] = []
    if run.offload:
        # FSDPParam.all_gather_inputs: the host shard copied to the device, then cast.
        for p in g.params:
            run.sched.alloc(pos, stage, p.padded * p.orig_size, PARAMETER)
            if p.compute_size != p.orig_size:
                run.sched.alloc(pos, stage, p.padded * p.compute_size, PARAMETER)
                run.sched.free(pos, stage, p.padded * p.orig_size, PARAMETER)
                inputs.append(p.padded * p.compute_size)
            else:
                inputs.append(p.padded * p.orig_size)
    elif g.copy_in_bytes:
        run.sched.alloc(pos, stage, g.copy_in_bytes, PARAMETER)
        inputs.append(g.copy_in_bytes)
    run.sched.alloc(pos, stage, g.all_gather_bytes, PARAMETER)
    if run.gloo:  # (world_size > 1 here)
        _gloo_all_gather(run, g, pos, stage)
    for nbytes in inputs:  # freed when foreach_all_gather returns
        run.sched.free(pos, stage, nbytes, PARAMETER)


def _gloo_all_gather(run: Replay, g: ParamGroup, pos: int, stage: int) -> None:
    """gloo's all_gather_into_tensor stages the gather in a flat tensor as large as the output
    (torch/csrc/distributed/c10d/ProcessGroupGloo.cpp, allgather: "Use single flat output
    tensor"); measured on torch 2.13: two such temporaries, one after the other, the first
    on the calling thread, the second in gloo's worker thread (``gloo:all_gather``)."""
    run.sched.alloc(pos, stage, g.all_gather_bytes, OTHER)
    run.sched.free(pos, stage, g.all_gather_bytes, OTHER)
    gloo_worker_picks_up(run, pos, stage)
    run.sched.alloc(pos, stage, g.all_gather_bytes, OTHER)
    run.sched.free(pos, stage, g.all_gather_bytes, OTHER)


def gloo_worker_picks_up(run: Replay, pos: int, stage: int) -> None:
    run.sched.free(pos, stage, run.gloo_lingering, OTHER)
    run.gloo_lingering = 0


def copy_out(run: Replay, g: ParamGroup, pos: int, stage: int) -> None:
    """wait_for_unshard -> foreach_all_gather_copy_out: each parameter's all_gather_outputs
    storage is (re)allocated and filled; the unsharded parameter is a view of it."""
    previous_input = 0
    for p in g.params:
        if g.world_size == 1 and (p.compute_size != p.orig_size or run.offload):
            # One rank: wait_for_unshard copies all_gather_inputs[0] (the shard cast to the
            # param dtype, or copied from the host), rebound per parameter: the previous
            # one dies once the next one exists.
            run.sched.alloc(pos, stage, p.padded * p.compute_size, PARAMETER)
            run.sched.free(pos, stage, previous_input, PARAMETER)
            previous_input = p.padded * p.compute_size
        run.sched.alloc(pos, stage, g.unsharded_bytes(p), PARAMETER)
        if p.shard_dim and g.world_size > 1:
            # Shard(i != 0): copied out into a temporary, then chunk-cat into its output
            run.sched.alloc(pos, stage, g.unsharded_bytes(p), TEMPORARY)
    run.sched.free(pos, stage, previous_input, PARAMETER)
    run.sched.free(pos, stage, sum(g.unsharded_bytes(p) for p in g.params if p.shard_dim and g.world_size > 1), TEMPORARY)
    run.unsharded.add(g.unit)


def reshard(run: Replay, g: ParamGroup, pos: int, stage: int) -> None:
    """FSDPParam.free_unsharded_param: free_storage of every all_gather_outputs tensor."""
    if g.unit not in run.unsharded:
        return
    run.unsharded.discard(g.unit)
    for p in g.params:
        run.sched.free(pos, stage, g.unsharded_bytes(p), PARAMETER)


def foreach_reduce(run: Replay, g: ParamGroup, pos: int) -> None:
    """The reduce-scatter half of FSDPParamGroup.post_backward (after its reshard).

    post_backward_rs_wait first drops the previous group's reduce-scatter input (held in
    FSDPCommContext.reduce_scatter_states, max_input_buffers=1); then foreach_reduce
    (_fsdp_collectives.py) allocates this group's input, copies the unsharded gradients in
    (chunk_cat), drops them, allocates the output (the flat sharded gradients, kept until
    zero_grad; a copy in the original dtype when that differs) and keeps the input."""
    sched = run.sched
    sched.free(pos, POST, run.reduce_scatter_pending, GRADIENT)
    run.reduce_scatter_pending = 0
    if not g.with_grad:
        return
    frees: list[tuple[int, list[int]]] = []  # the unsharded gradients (bytes, storages), in the group's parameter order
    for p in g.with_grad:
        if p.index in run.accumulated:
            frees.append((run.accumulated.pop(p.index), []))
        else:
            frees.append((0, run.alive_grads(p, pos)))
    doubled = _cat_chunks_on_dim_0(run, g, pos, frees)
    sched.alloc(pos, POST, g.reduce_input_bytes, GRADIENT)
    for p, (nbytes, _) in zip(g.with_grad, frees):
        if run.cpu and not nbytes and p.compute_size != p.reduce_size:
            _cpu_chunk_cat_cast(run, p, pos)
    # unsharded_grads.clear() frees them, except the last one: foreach_reduce's loop variable
    # ``unsharded_grad`` (the Shard(i != 0) loop, run whenever world_size > 1) still refers
    # to it until the function returns.
    last = frees.pop() if g.world_size > 1 else None
    for nbytes, storages in frees:
        _free_grad(run, pos, nbytes, storages)
    sched.free(pos, POST, doubled, GRADIENT)
    sched.alloc(pos, POST, g.reduce_output_bytes, GRADIENT)
    if g.world_size == 1 and g.divide_factor:
        # one rank: no reduce-scatter, the input divided into a new tensor and copied out
        sched.alloc(pos, POST, g.reduce_input_bytes, TEMPORARY)
        sched.free(pos, POST, g.reduce_input_bytes, TEMPORARY)
    if run.gloo and g.world_size > 1:
        _gloo_reduce_scatter(run, g, pos)
    kept = g.reduce_output_bytes
    if g.sharded_grad_bytes != g.reduce_output_bytes:
        sched.alloc(pos, POST, g.sharded_grad_bytes, GRADIENT)
        sched.free(pos, POST, g.reduce_output_bytes, GRADIENT)
        kept = g.sharded_grad_bytes
    if last is not None:
        _free_grad(run, pos, *last)
    if run.offload:
        # CPUOffloadPolicy: new_sharded_grad.to("cpu"); the device buffer dies with
        # foreach_reduce's locals.
        sched.free(pos, POST, kept, GRADIENT)
    else:
        run.sharded_grads[g.unit] = run.sharded_grads.get(g.unit, 0) + kept
    run.reduce_scatter_pending = g.reduce_input_bytes


def _cat_chunks_on_dim_0(run: Replay, g: ParamGroup, pos: int, frees: list[tuple[int, list[int]]]) -> int:
    """foreach_reduce's Shard(i != 0) loop (world_size > 1): such a gradient is replaced in
    ``unsharded_grads`` by a dim-0 cat of its chunks, a copy as large, while the loop variable
    holds the original until the next iteration. Returns the bytes still doubled after the
    loop (the last gradient's, when it is one), freed with the others by unsharded_grads.clear()."""
    if g.world_size == 1:
        return 0
    doubled = 0
    for p, (nbytes, storages) in zip(g.with_grad, frees):
        run.sched.free(pos, POST, doubled, GRADIENT)  # the loop variable moves on: the original dies
        doubled = 0
        if p.shard_dim:
            doubled = nbytes or sum(int(run.trace.storage_bytes[s]) for s in storages)
            run.sched.alloc(pos, POST, doubled, GRADIENT)
    return doubled


def _free_grad(run: Replay, pos: int, nbytes: int, storages: list[int]) -> None:
    run.sched.free(pos, POST, nbytes, GRADIENT)
    for s in storages:
        run.kill(pos, POST, s)


def _cpu_chunk_cat_cast(run: Replay, p: ShardedParam, pos: int) -> None:
    """foreach_reduce_scatter_copy_in (torch._chunk_cat into the fp32 reduce-scatter input):
    on CPU the cat of a low-precision gradient into an fp32 output goes through a temporary
    as large as the gradient, one gradient at a time (measured on torch 2.13, ``aten::cat``).
    Planned for CPU runs only: the CUDA cat converts dtypes in its copy kernel."""
    run.sched.alloc(pos, POST, p.numel * p.compute_size, TEMPORARY)
    run.sched.free(pos, POST, p.numel * p.compute_size, TEMPORARY)


def _gloo_reduce_scatter(run: Replay, g: ParamGroup, pos: int) -> None:
    """gloo's reduce_scatter_tensor reduces a copy of the whole input (an ``empty_strided``
    as large as the reduce-scatter input, measured on torch 2.13) owned by the gloo work.

    The work is destroyed by whichever thread drops it last: the caller right after the
    collective, or gloo's worker thread (ProcessGroupGloo::runLoop keeps ``work`` until its
    bookkeeping after ``AsyncWork::execute`` is done). On a loaded machine the worker often
    runs late, and the copy outlives the collective until that thread runs again, at the
    latest when it picks up the next collective (measured: the free shows up anywhere from
    right after the reduce-scatter to the next collective). ``GLOO_WORK_LINGERS`` picks the
    bound planned."""
    gloo_worker_picks_up(run, pos, POST)
    run.sched.alloc(pos, POST, g.reduce_input_bytes, OTHER)
    if GLOO_WORK_LINGERS:
        run.gloo_lingering += g.reduce_input_bytes
    else:
        run.sched.free(pos, POST, g.reduce_input_bytes, OTHER)

