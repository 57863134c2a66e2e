"""FSDP2's hooks replayed over the traced step of the unwrapped model (see strategies/fsdp2.py).

The trace marks where each unit's forward and backward start and end; FSDP2 runs its hooks
exactly there (torch/distributed/fsdp/_fully_shard/_fsdp_state.py, _fsdp_param_group.py):
pre_forward / post_forward on the unit's forward, pre_backward as a tensor hook on the
unit's outputs (the trace's ``bwd_start``), post_backward as an autograd node on the unit's
inputs (``bwd_end``), and the root's final callback at the end of backward.
"""

from __future__ import annotations

from dpplan.planner.strategies.fsdp2_buffers import (
    POST,
    PRE,
    Replay,
    all_gather,
    copy_out,
    foreach_reduce,
    gloo_worker_picks_up,
    reshard,
)
from dpplan.planner.trace import GRADIENT, PARAMETER, TEMPORARY, StepTrace, trace_index


def replay_step(run: Replay) -> None:
    """Every micro-batch's hooks, then the sharded gradients' release at zero_grad."""
    _replay_micro_batches(run)
    free_sharded_grads_at_zero_grad(run)
    run.sched.apply()


def pre_forward(run: Replay, unit: int, pos: int) -> None:
    """FSDPParamGroup.pre_forward: unshard + wait_for_unshard. In forward the previous
    all-gather output is released only when wait_for_unshard returns (its local reference
    ``prev_all_gather_state`` lives until then), i.e. after this unit's copy-out; this
    unit's output is kept in all_gather_state for the next one."""
    g = run.groups.get(unit)
    if g is None or unit in run.unsharded:
        return  # unshard and wait_for_unshard are no-ops
    all_gather(run, g, pos, PRE)
    copy_out(run, g, pos, PRE)
    run.sched.free(pos, PRE, run.all_gather_pending, PARAMETER)
    run.all_gather_pending = g.all_gather_bytes if g.world_size > 1 else 0


def _post_forward(run: Replay, unit: int, pos: int, *, root: bool) -> None:
    """FSDPParamGroup.post_forward: reshard (not for the root: fully_shard's
    reshard_after_forward=None leaves the root unsharded, FSDPState._lazy_init) and record
    the post-forward order used by backward prefetching. The root's FSDPState._post_forward
    then drops the pending all-gather output."""
    g = run.groups.get(unit)
    if g is not None:
        if not root:
            reshard(run, g, pos, POST)
        run.post_forward_order.append(unit)
    if root:
        run.sched.free(pos, POST, run.all_gather_pending, PARAMETER)
        run.all_gather_pending = 0


def _pre_backward(run: Replay, unit: int, pos: int) -> None:
    """FSDPParamGroup.pre_backward: unshard (unless prefetched) + wait_for_unshard, which in
    backward frees the all-gather output right after the copy-out; then _backward_prefetch
    all-gathers the group that ran post-forward just before this one. The root is still
    unsharded from forward, so only its prefetch does anything."""
    g = run.groups.get(unit)
    if g is None:
        return
    if unit not in run.unsharded:
        if unit not in run.prefetched:
            all_gather(run, g, pos, PRE)
        run.prefetched.discard(unit)
        copy_out(run, g, pos, PRE)
        if g.world_size > 1:
            run.sched.free(pos, PRE, g.all_gather_bytes, PARAMETER)
    order = run.post_forward_order
    if unit in order:
        index = order.index(unit)
        if index > 0:
            target = order[index - 1]
            # unshard() is a no-op for a group already unsharded or with a pending result.
            if target not in run.prefetched and target not in run.unsharded:
                all_gather(run, run.groups[target], pos, PRE)
                if run.groups[target].world_size > 1:
                    run.prefetched.add(target)


def _post_backward(run: Replay, unit: int, pos: int, *, sync: bool, new_grads: dict[int, int]) -> None:
    """FSDPParamGroup.post_backward (_fsdp_param_group.py)."""
    g = run.groups.get(unit)
    if g is None:
        return
    sched = run.sched
    # post_backward_accumulate: fp32 accumulated grad += this micro-batch's low-precision
    # grad (the add upcasts it into a temporary), then the grad is dropped.
    for p in g.with_grad:
        if p.index in run.accumulated and p.index in new_grads:
            upcast = in_reduce_dtype(run, p, [new_grads[p.index]])
            sched.alloc(pos, POST, upcast, TEMPORARY)
            sched.free(pos, POST, upcast, TEMPORARY)
            run.kill(pos, POST, new_grads[p.index])
    reshard(run, g, pos, POST)
    if not sync:
        # set_requires_gradient_sync(False): keep the unsharded grads; under mixed precision
        # FSDPParam.to_accumulated_grad_if_needed moves each into an fp32 copy.
        for p in g.with_grad:
            if p.reduce_size != p.compute_size and p.index not in run.accumulated:
                alive = run.alive_grads(p, pos)
                accumulated = in_reduce_dtype(run, p, alive) if alive else p.numel * p.reduce_size
                sched.alloc(pos, POST, accumulated, GRADIENT)
                run.accumulated[p.index] = accumulated
                for s in alive:
                    run.kill(pos, POST, s)
        return
    foreach_reduce(run, g, pos)


def in_reduce_dtype(run: Replay, p, grads: list[int]) -> int:
    """Bytes of the unsharded gradient ``grads`` (storages) cast to the reduce dtype. Their
    size, not the parameter's: under tensor parallelism a vocabulary-parallel embedding's
    gradient arrives replicated, the whole table on every rank (measured: FSDP2's
    ``unsharded_accumulated_grad`` of a RowwiseParallel embedding is a Replicate DTensor of
    the full shape), where a plain parameter's is its own size."""
    traced = sum(int(run.trace.storage_bytes[s]) for s in grads)
    return traced * p.reduce_size // p.compute_size


def final_callback(run: Replay, pos: int) -> None:
    """FSDPState._root_post_backward_final_callback: reduce_scatter_states.clear()."""
    run.sched.free(pos, POST, run.reduce_scatter_pending, GRADIENT)
    run.reduce_scatter_pending = 0
    # The backward is over: the main thread leaves the cores to gloo's worker (measured: a
    # lingering work is gone before the optimizer's first allocation).
    gloo_worker_picks_up(run, pos, POST)
    # finalize_backward drops an all-gather prefetched for a group whose backward never ran.
    for unit in sorted(run.prefetched):
        run.sched.free(pos, POST, run.groups[unit].all_gather_bytes, PARAMETER)
    run.prefetched.clear()
    run.post_forward_order.clear()


_STAGE = {
    "fwd_start": PRE, "fwd_end": POST, "root_fwd_end": POST,
    "root_bwd_start": PRE, "bwd_start": PRE, "bwd_end": POST,
}


def _hooks(markers: list, root: int) -> list[tuple[int, int, int, str, int]]:
    """(position, stage, order, kind, unit) of FSDP's hooks in one micro-batch, in run order.

    The first forward start/end and backward start/end of each unit count. Where the trace
    has no root_fwd_end / root_bwd_start marker (the root's outputs need no gradient), the
    root's post-forward and pre-backward fall back to where backward starts."""
    seen: set[tuple[str, int]] = set()
    hooks = []
    backward = next((m.event for m in markers if m.kind == "backward"), None)
    for order, m in enumerate(markers):
        if m.kind not in _STAGE or (m.kind, m.index) in seen:
            continue
        seen.add((m.kind, m.index))
        hooks.append((m.event, _STAGE[m.kind], order, m.kind, m.index))
    for kind in ("root_fwd_end", "root_bwd_start"):
        if (kind, root) not in seen and backward is not None:
            hooks.append((backward, _STAGE[kind], -1 if kind == "root_fwd_end" else len(markers), kind, root))
    if ("bwd_end", root) not in seen:
        hooks.append((markers[-1].event, POST, len(markers) + 1, "bwd_end", root))
    return sorted(hooks)


def _new_grad_temporaries(trace: StepTrace, number: int) -> dict[int, int]:
    """Parameter -> the storage autograd produced as its gradient in micro-batch ``number`` > 0
    (planner/trace/index.py ``gradient_contributions``). In the unwrapped trace AccumulateGrad
    adds it into the existing ``.grad`` and frees it; under FSDP2 mixed precision the ``.grad``
    was moved to an fp32 copy, so this tensor becomes ``.grad`` and lives until the unit's
    post_backward."""
    contributions = trace_index(trace).gradient_contributions
    return {param: storages[0] for (micro, param), storages in contributions.items() if micro == number and storages}


def _replay_micro_batches(run: Replay) -> None:
    trace = run.trace
    root = len(trace.unit_names) - 1
    batches = [span.markers for span in trace_index(trace).micro_batches]
    for number, markers in enumerate(batches):
        sync = number == len(batches) - 1  # training_step: sync only on the last micro-batch
        new_grads = _new_grad_temporaries(trace, number) if number > 0 else {}
        finished: set[int] = set()
        for pos, _, _, kind, unit in _hooks(markers, root):
            is_root = unit == root
            if kind == "fwd_start":
                pre_forward(run, unit, pos)
            elif kind == "fwd_end" and not is_root:
                _post_forward(run, unit, pos, root=False)
            elif kind == "root_fwd_end":
                _post_forward(run, unit, pos, root=True)
            elif kind in ("root_bwd_start", "bwd_start"):
                _pre_backward(run, unit, pos)
            elif kind == "bwd_end" and not is_root:
                _post_backward(run, unit, pos, sync=sync, new_grads=new_grads)
                finished.add(unit)
            elif kind == "bwd_end":
                # The root's post_backward runs in the final callback, then that of every
                # group whose own hook did not fire (FSDPState._root_post_backward_final_callback).
                _post_backward(run, root, pos, sync=sync, new_grads=new_grads)
                for other in sorted(run.groups):
                    if other != root and other not in finished:
                        _post_backward(run, other, pos, sync=sync, new_grads=new_grads)
                final_callback(run, pos)


def free_sharded_grads_at_zero_grad(run: Replay) -> None:
    """zero_grad(set_to_none=True) drops the gradient views one parameter at a time; a
    unit's flat buffer dies with the view of its last parameter, where the trace frees that
    parameter's gradient."""
    trace = run.trace
    optimizer = trace_index(trace).optimizer
    for unit, nbytes in run.sharded_grads.items():
        deaths = [
            int(run.death[s])
            for p in run.groups[unit].with_grad
            for s in run.grads[p.index]
            if run.birth[s] < optimizer <= run.death[s]
        ]
        position = max(deaths) if deaths else len(trace.event_storage)
        run.sched.free(position, POST, nbytes, GRADIENT)

