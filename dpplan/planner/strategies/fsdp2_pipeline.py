"""FSDP2 under a pipeline: the hooks of one pipeline rank's traced step (planner/trace/
pipeline_rank.py), as torch's ``PipelineStage`` drives an FSDP2 stage.

The real run (profiler/pipeline_run.py) shards each unit and then each stage module with
``reshard_after_forward=False``, torchtitan's default under a pipeline (torchtitan/models/
llama3/infra/parallelize.py ``apply_fsdp``), and the stage runs every backward with gradient
sync and resharding off (torch/distributed/pipelining/stage.py ``backward_maybe_with_nosync``:
``set_is_last_backward(False)``, ``set_reshard_after_backward(False)``,
``set_requires_gradient_sync(False)``). So, in trace order over the schedule's interleaved
micro-batches:
  - a group is all-gathered at its first forward of the step (the stage module's own group
    when the stage's first forward starts, each unit at its own) and stays unsharded for the
    whole step; every later unshard is a no-op;
  - after each backward of a unit its post_backward only accumulates: under mixed precision
    the first micro-batch's gradient moves into an fp32 ``unsharded_accumulated_grad``, a later
    one (autograd's new ``.grad``, which lives until then) is added into it; in fp32 autograd
    accumulates into ``.grad`` itself, as traced. The stage's own group, and any unit whose
    hook did not fire, does the same in the root's final callback at the end of that backward
    (FSDP_SRC/_fsdp_state.py ``_root_post_backward_final_callback``);
  - after the step's last backward ``perform_reduce_grad`` (stage.py) runs every group's
    post_backward with sync on, in ``all_states`` order (the stage module's group first, then
    its units in module order): reshard, then reduce-scatter as strategies/fsdp2.py plans it;
    then the root's final callback releases the last reduce-scatter input.
One FSDP root per traced rank is planned: a rank holding two stages (the looped schedules)
has one root group per stage module in the real run, planned here as one.
"""

from __future__ import annotations

from dpplan.planner.strategies.fsdp2_buffers import POST, Replay, foreach_reduce, reshard
from dpplan.planner.strategies.fsdp2_hooks import (
    final_callback,
    free_sharded_grads_at_zero_grad,
    in_reduce_dtype,
    pre_forward,
)
from dpplan.planner.trace import GRADIENT, PARAMETER, TEMPORARY, StepTrace, trace_index

CHUNK_ENDS = ("pipeline_forward", "backward")
"""Markers that start a stage's next forward or backward chunk: where the previous chunk's
root post-forward, or final callback, has run; so has the last one's at "reduce_grad" (the
schedule's ``perform_reduce_grad`` call, planner/trace/pipeline_rank.py)."""


def replay_pipeline_step(run: Replay) -> None:
    """The step's hooks in trace order (module docstring), then zero_grad's release."""
    trace = run.trace
    root = len(trace.unit_names) - 1
    (span,) = trace_index(trace).micro_batches  # a pipeline trace is one span: the whole schedule
    contributions = _contributions(trace)
    chunk: str | None = None  # "forward" or "backward": the stage chunk running
    fired: set[int] = set()
    reduced = False
    for marker in span.markers:
        kind, pos = marker.kind, marker.event
        if kind in CHUNK_ENDS or kind == "reduce_grad":
            if chunk == "forward":  # the root's post_forward drops the last all-gather output
                run.sched.free(pos, POST, run.all_gather_pending, PARAMETER)
                run.all_gather_pending = 0
            elif chunk == "backward":
                for unit in [root, *sorted(u for u in run.groups if u != root and u not in fired)]:
                    _accumulate(run, unit, pos, contributions)
            fired.clear()
            chunk = {"pipeline_forward": "forward", "backward": "backward"}.get(kind)
        if kind == "pipeline_forward":
            pre_forward(run, root, pos)  # the stage module's own group, once per step
        elif kind == "fwd_start" and marker.index != root:
            pre_forward(run, marker.index, pos)
        elif kind == "bwd_end" and marker.index != root:
            _accumulate(run, marker.index, pos, contributions)
            fired.add(marker.index)
        elif kind == "reduce_grad":  # one per stage chunk's module; one root is planned
            if not reduced:
                _reduce_grads(run, root, pos)
            reduced = True
    free_sharded_grads_at_zero_grad(run)
    run.sched.apply()


def _contributions(trace: StepTrace) -> dict[int, list[tuple[int, int]]]:
    """Parameter -> (position, storage) of each gradient autograd produced for it over the
    schedule: the first is ``.grad``, each later one the tensor AccumulateGrad summed into it
    and freed (the storage on its grad marker, step_trace.py ``Marker.storage``)."""
    found: dict[int, list[tuple[int, int]]] = {}
    optimizer = trace_index(trace).optimizer
    for marker in trace.markers:
        if marker.kind != "grad" or marker.event > optimizer:
            continue
        made = found.setdefault(marker.index, [])
        storage = marker.storage if made else trace.params[marker.index].grad_storage
        made.append((marker.event, storage))
    return found


def _accumulate(run: Replay, unit: int, pos: int, contributions: dict[int, list[tuple[int, int]]]) -> None:
    """FSDPParamGroup.post_backward without gradient sync or resharding (FSDP_SRC/
    _fsdp_param_group.py): accumulate_unsharded_grad_if_needed, then
    to_accumulated_grad_if_needed. Only mixed precision moves anything (module docstring)."""
    g = run.groups.get(unit)
    if g is None:
        return
    for p in g.with_grad:
        if p.reduce_size == p.compute_size:
            continue
        made = contributions.get(p.index, [])
        new = [s for event, s in made if event <= pos and s >= 0 and s not in run.killed]
        if not new:
            continue
        if p.index in run.accumulated:
            # the add upcasts the new gradient into a temporary, then the gradient is dropped;
            # it lived as ``.grad`` until now, not only until AccumulateGrad's in-place add
            for s in new:
                upcast = in_reduce_dtype(run, p, [s])
                run.sched.alloc(pos, POST, upcast, TEMPORARY)
                run.sched.free(pos, POST, upcast, TEMPORARY)
                run.kill(pos, POST, s)
        else:
            accumulated = in_reduce_dtype(run, p, new[:1])
            run.sched.alloc(pos, POST, accumulated, GRADIENT)
            run.accumulated[p.index] = accumulated
            for s in new:
                run.kill(pos, POST, s)


def _reduce_grads(run: Replay, root: int, pos: int) -> None:
    """stage.py ``perform_reduce_grad``: every group's post_backward with sync on, the stage
    module's group first, then the root's final callback."""
    for unit in [root, *sorted(u for u in run.groups if u != root)]:
        g = run.groups.get(unit)
        if g is None:
            continue
        reshard(run, g, pos, POST)
        foreach_reduce(run, g, pos)
    final_callback(run, pos)

