"""Plan per-rank memory for every requested strategy and GPU count: the planner's entry point.

model file -> trace (once per precision family) -> per strategy and rank: timeline -> peak,
breakdown, largest micro-batch that fits -> ``Plan``.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from dpplan.config import PlanConfig, usable_bytes
from dpplan.errors import UsageError
from dpplan.planner import cpu_isa, forked, gpu_overheads
from dpplan.planner.deepspeed_config import resolve_for_model
from dpplan.planner.hardware import GpuSpec, lookup_gpu
from dpplan.planner.plan import ModelSummary, ModuleActivation, Plan, StrategyEstimate
from dpplan.planner.recommendation import recommend
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import RankPlan
from dpplan.planner.strategies.registry import Wrapper, planner_of, strategy_info
from dpplan.planner.timeline import Peak
from dpplan.planner.trace import (
    ACTIVATION,
    AUTOCAST,
    ENGINE_CAST,
    PARAM_CAST,
    TRACE_BATCH_SIZE,
    StepTrace,
    TraceError,
    TraceSettings,
    has_floating_buffers,
    has_floating_inputs,
    trace_index,
    trace_step,
    untraced_model,
)
from dpplan.training.model_file import ModelSpec, example_batch_for, load_model_file

BREAKDOWN_OF_CATEGORY = {
    "parameter": "params",
    "gradient": "grads",
    "optimizer_state": "optimizer",
    "optimizer_temporary": "optimizer",
    "activation": "activations",
    "temporary": "activations",
    "buffer": "other",
    "input": "other",
    "other": "other",
}
BREAKDOWN_KEYS = ("params", "grads", "optimizer", "activations", "other")
TOP_MODULES = 10


def trace_settings_for(
    strategy: str, config: PlanConfig, *, floating_buffers: bool = True, floating_inputs: bool = True
) -> TraceSettings:
    """The trace a strategy needs. Strategies with the same settings share one trace; a model
    without floating buffers (``floating_buffers=False``) gives FSDP1 and FSDP2 one trace, and
    one without floating inputs (``floating_inputs=False``) gives DeepSpeed and FSDP2 one."""
    info = strategy_info(strategy)
    mixed = config.run.precision in ("bf16-mixed", "fp16-mixed")
    family = AUTOCAST
    if mixed and info.wrapper is Wrapper.DEEPSPEED:
        if not config.run.zero.torch_autocast:
            # parameters cast, buffers kept, as FSDP2 traces them; the two differ only in where
            # floating inputs are cast (before the step, or at the root's forward)
            family = ENGINE_CAST if floating_inputs else PARAM_CAST
    elif mixed and info.casts_parameters:
        family = PARAM_CAST
    return TraceSettings(
        precision=config.run.precision,
        family=family,
        cast_buffers=family == PARAM_CAST and info.casts_buffers and floating_buffers,
        optimizer=config.run.optimizer,
        activation_checkpointing=config.run.activation_checkpointing,
        num_micro_batches=2 if config.run.grad_accum > 1 else 1,
        grad_accum=config.run.grad_accum,
        wrap=config.run.wrap,
        tp=config.run.tp,
        sequence_parallel=config.run.sequence_parallel,
        ep=config.run.ep,
        pp=config.run.pp,
        pp_schedule=config.run.pp_schedule,
        cp=config.run.cp,
        # a context-parallel rank's share of each sequence (config checks it divides)
        seq_len=config.run.seq_len // config.run.cp if config.run.seq_len else None,
        device_type=config.device,
        # only CPU kernels are measured (at the plan's batch): GPU traces stay batch-free
        kernel_batch_size=config.run.batch_size if config.device == "cpu" else TraceSettings.kernel_batch_size,
    )


def trace_at_planning_batch(spec: ModelSpec, settings: TraceSettings, batch_size: int) -> StepTrace:
    """``trace_step`` at the prime micro-batch every plan is traced at; when the model rejects
    it, the step traced at the user's own micro-batch says why in the user's numbers (a shape
    error then names their batch size, not the planner's 1009)."""
    try:
        return trace_step(spec, settings)
    except TraceError as prime_failure:
        try:
            trace_step(spec, settings, batch_size=batch_size)
        except TraceError as failure:
            raise failure from None
        raise TraceError(f"{prime_failure} (at the planner's trace micro-batch {TRACE_BATCH_SIZE}; the model "
                         f"runs at micro-batch {batch_size}: does it hard-code a batch size?)") from None


def capacity_for(config: PlanConfig, gpus: int) -> int:
    if config.capacity_bytes is not None:
        return config.capacity_bytes
    if config.device == "cuda":
        return lookup_gpu(config.gpu).memory_bytes
    import psutil

    ranks_per_node = max(1, gpus // config.nodes_for(gpus))
    return psutil.virtual_memory().total // ranks_per_node


def applicable(strategy: str, gpus: int, config: PlanConfig) -> bool:
    """Whether ``strategy`` plans at ``gpus``: a one-rank strategy only without data parallelism."""
    return gpus == config.run.tp * config.run.pp * config.run.cp or not strategy_info(strategy).single_device


def estimate(config: PlanConfig, spec: ModelSpec | None = None, *, processes: int | None = None) -> Plan:
    """Plan every requested strategy and GPU count. ``processes``: 1 plans in this process,
    2 hands a share to a forked child (planner/forked.py); None decides by the plan's size."""
    if config.device == "cpu":
        cpu_isa.apply(config.cpu_isa)
        cpu_isa.check_supported(config.cpu_isa)
    if config.run.seq_len is not None and config.run.seq_len % TRACE_BATCH_SIZE == 0:
        # a sequence as long as a multiple of the trace's batch would read as a second batch dim
        raise UsageError(f"--seq-len {config.run.seq_len}: multiples of {TRACE_BATCH_SIZE} (the prime micro-batch "
                         "the planner traces at, planner/trace/step_trace.py) cannot be planned")
    spec = spec or load_model_file(config.run.model)
    if config.run.zero.hidden_size_auto:
        config = replace(config, run=replace(config.run, zero=resolve_for_model(config.run.zero, untraced_model(spec))))
    unsupported = refused_strategies(config.strategies, untraced_model(spec))
    strategies = [s for s in config.strategies if s not in unsupported]
    if not strategies:
        raise UsageError("; ".join(f"{s}: {reason}" for s, reason in unsupported.items()))
    families: dict[TraceSettings, list[str]] = {}
    floating_buffers = has_floating_buffers(spec)
    floating_inputs = has_floating_inputs(spec)
    for strategy in strategies:
        settings = trace_settings_for(
            strategy, config, floating_buffers=floating_buffers, floating_inputs=floating_inputs
        )
        families.setdefault(settings, []).append(strategy)
    # The first trace runs here before anything else: it pays for torch's lazy imports once.
    first = next(iter(families))
    start = time.perf_counter()
    traces = {first: trace_at_planning_batch(spec, first, config.run.batch_size)}
    first_seconds = time.perf_counter() - start
    items = {
        settings: [(settings, strategy, gpus) for strategy in strategies for gpus in config.gpus
                   if applicable(strategy, gpus, config)]
        for settings, strategies in families.items()
    }
    num_estimates = sum(len(family) for family in items.values())
    if config.run.pp > 1:  # one trace per pipeline rank, planned here
        estimates, trace_seconds = _plan_pipelines(spec, config, items, traces, processes)
        processes = 0
    elif processes is None:
        size = len(traces[first].event_storage) * num_estimates
        processes = 2 if size >= forked.MIN_WORK else 1
    if processes == 0:
        pass
    elif processes == 1 or not forked.can_fork() or num_estimates > forked.WorkQueue.MAX_COUNT:
        everything = [item for family in items.values() for item in family]
        estimates, trace_seconds = _plan_items(spec, config, everything, traces)
    else:
        estimates, trace_seconds = _plan_in_two_processes(spec, config, items, first, traces)
    order = {s: i for i, s in enumerate(config.strategies)}
    estimates.sort(key=lambda e: (e.gpus, order[e.strategy]))
    summary = summarize_model(spec, traces[first], config, first_seconds + trace_seconds)
    return Plan(config=config, model=summary, estimates=estimates, unsupported=unsupported,
                recommendation=recommend(estimates))


def _plan_pipelines(
    spec: ModelSpec, config: PlanConfig, items: dict[TraceSettings, list], traces: dict, processes: int | None
) -> tuple[list[StrategyEstimate], float]:
    """Estimates with pipeline parallelism: every pipeline rank traced once per family
    (planner/pipeline_estimate.py)."""
    from dpplan.planner.pipeline_estimate import estimate_pipeline, pipeline_traces

    start = time.perf_counter()
    estimates = []
    for settings, family in items.items():
        ranks = pipeline_traces(settings, config.run.pp,
                                lambda s: trace_at_planning_batch(spec, s, config.run.batch_size), traces,
                                fork=processes != 1)
        estimates += [estimate_pipeline(ranks, strategy, gpus, config, estimate_strategy) for _, strategy, gpus in family]
    return estimates, time.perf_counter() - start


def refused_strategies(strategies, model) -> dict[str, str]:
    """Each strategy whose real wrapper would refuse ``model``, with the reason it gives."""
    refused = {}
    for strategy in strategies:
        reason = planner_of(strategy).refusal(model)
        if reason:
            refused[strategy] = reason
    return refused


HELP_MIN_ESTIMATES = 12
"""A process traces a family the other one owns, to help with its estimates, only when at
least this many are left (a trace costs about as much as a dozen estimates of a 70B model)."""


def _plan_in_two_processes(
    spec: ModelSpec, config: PlanConfig, items: dict[TraceSettings, list], traced: TraceSettings, traces: dict
) -> tuple[list[StrategyEstimate], float]:
    """Each family's estimates wait in a queue of their own. The child first traces and plans
    the largest untraced family, this process the other untraced ones; then both plan the
    already traced family (the child inherited its trace), then help with the other's
    families while enough of them is left. Whichever is faster does more."""
    untraced = sorted((s for s in items if s != traced), key=lambda s: len(items[s]), reverse=True)
    child_order = untraced[:1] + [traced] + untraced[1:]
    parent_order = untraced[1:] + [traced] + untraced[:1]
    queues = {settings: forked.WorkQueue(len(family)) for settings, family in items.items()}
    owned = {"child": set(untraced[:1]) | {traced}, "parent": set(untraced[1:]) | {traced}}

    def plan(order: list[TraceSettings], mine: set) -> tuple[list, float]:
        estimates, trace_seconds = [], 0.0
        for settings in order:
            queue, family = queues[settings], items[settings]
            if settings not in traces and settings not in mine and queue.remaining() < HELP_MIN_ESTIMATES:
                continue  # the other process will be done with it before a trace here would
            while (index := queue.take()) is not None:
                done, seconds = _plan_items(spec, config, [family[index]], traces)
                estimates += done
                trace_seconds += seconds
        return estimates, trace_seconds

    try:
        child = forked.start(lambda: plan(child_order, owned["child"]))
    except OSError:  # no process to be had (a limit, no memory): plan everything here
        for queue in queues.values():
            queue.close()
        return _plan_items(spec, config, [item for family in items.values() for item in family], traces)
    try:
        estimates, trace_seconds = plan(parent_order, owned["parent"])
        child_estimates, child_seconds = child.result()
    finally:
        child.cancel()
        for queue in queues.values():
            queue.close()
    return estimates + child_estimates, trace_seconds + child_seconds


def _plan_items(
    spec: ModelSpec, config: PlanConfig, items: list[tuple[TraceSettings, str, int]], traces: dict
) -> tuple[list[StrategyEstimate], float]:
    """Estimates for ``items`` (settings, strategy, GPU count), tracing what ``traces`` lacks;
    the seconds spent tracing."""
    estimates = []
    trace_seconds = 0.0
    for settings, strategy, gpus in items:
        if settings not in traces:
            start = time.perf_counter()
            traces[settings] = trace_at_planning_batch(spec, settings, config.run.batch_size)
            trace_seconds += time.perf_counter() - start
        if strategy is not None:  # (settings, None, 0): the trace only
            estimates.append(estimate_strategy(traces[settings], strategy, gpus, config))
    return estimates, trace_seconds


def estimate_strategy(trace: StepTrace, strategy: str, gpus: int, config: PlanConfig) -> StrategyEstimate:
    planner = planner_of(strategy)
    nodes = config.nodes_for(gpus)
    layout = Layout.of(
        strategy,
        gpus,
        nodes,
        tp=config.run.tp,
        ep=config.run.ep,
        pp=config.run.pp,
        cp=config.run.cp,
        precision=config.run.precision,
        grad_accum=config.run.grad_accum,
        offload=config.run.offload,
        device_type=config.device,
        zero=config.run.zero,
    )
    capacity = capacity_for(config, gpus)
    usable = usable_bytes(capacity, config.headroom_pct)
    gpu = lookup_gpu(config.gpu) if config.device == "cuda" else None
    best: tuple[int, int, Peak, RankPlan, dict] | None = None
    max_batch = None
    for rank in planner.ranks_to_evaluate(trace, layout):
        plan = planner.plan_rank(trace, layout.with_rank(rank))
        timeline = plan.timeline
        peak = timeline.peak(config.run.batch_size)
        runtime = runtime_terms(plan, peak, gpu, layout, config.run.batch_size)
        offloaded = offloaded_on_this_rank(plan, layout)  # 0 on cuda
        runtime = {key: value + offloaded for key, value in runtime.items()}
        total = runtime["device_bytes"]
        if best is None or total > best[0]:
            best = (total, rank, peak, plan, runtime)
        # The largest batch that fits on every rank, with the headroom kept free.
        fixed = runtime["device_bytes"] - peak.peak_bytes
        rank_max = timeline.max_batch_size(usable - fixed)
        max_batch = rank_max if max_batch is None else min(max_batch, rank_max)
    assert best is not None
    total, rank, peak, plan, runtime = best
    notes = list(trace.notes) + list(plan.notes)
    if config.run.offload != "none" and not strategy_info(strategy).offload:
        notes.append(f"{strategy} has no offload in torch; planned without offload (use zero* or fsdp*)")
    breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0)
    for category, nbytes in peak.bytes_by_category.items():
        breakdown[BREAKDOWN_OF_CATEGORY[category]] += nbytes
    offloaded = offloaded_on_this_rank(plan, layout)
    breakdown["optimizer"] += offloaded
    breakdown["other"] += runtime["device_bytes"] - peak.peak_bytes - offloaded
    return StrategyEstimate(
        strategy=strategy,
        gpus=gpus,
        nodes=nodes,
        batch_size=config.run.batch_size,
        grad_accum=config.run.grad_accum,
        precision=config.run.precision,
        optimizer=config.run.optimizer,
        activation_checkpointing=config.run.activation_checkpointing,
        offload=config.run.offload,
        device=config.device,
        gpu=gpu.name if gpu else None,
        breakdown=breakdown,
        peak_bytes=total,
        peak_allocated_bytes=runtime["allocated_bytes"],
        peak_reserved_bytes=runtime["reserved_bytes"],
        peak_rank=rank,
        peak_phase=peak.phase,
        capacity_bytes=capacity,
        fits=total <= usable,
        max_batch_size=int(max_batch or 0),
        host_bytes=plan.host_bytes,
        notes=notes,
        dp=layout.mesh.dp_size, tp=layout.mesh.tp, pp=layout.mesh.pp, cp=layout.mesh.cp, ep=layout.mesh.ep,
        sp=config.run.sequence_parallel,
        headroom_pct=config.headroom_pct,
    )


def offloaded_on_this_rank(plan: RankPlan, layout: Layout) -> int:
    """On a CPU run the offloaded state (DeepSpeed's host copies, from its initialization on)
    is in the same memory as everything else: one rank's share of ``host_bytes``."""
    if layout.device_type != "cpu" or not plan.host_bytes:
        return 0
    return plan.host_bytes // layout.ranks_per_node


def runtime_terms(plan: RankPlan, peak: Peak, gpu: GpuSpec | None, layout: Layout, batch_size: int) -> dict:
    """allocated / reserved / device bytes at the peak (equal on cpu)."""
    if gpu is None:
        return {"allocated_bytes": peak.peak_bytes, "reserved_bytes": peak.peak_bytes, "device_bytes": peak.peak_bytes}
    blocks = plan.timeline.live_blocks_at(peak.position, batch_size)
    rounded = gpu_overheads.round_blocks(blocks)
    allocated = peak.peak_bytes + int(rounded.sum() - blocks.sum()) + gpu_overheads.cublas_workspace_bytes(gpu)
    reserved = allocated + gpu_overheads.segment_slack(rounded)
    groups = planner_of(layout.strategy).process_groups(layout)
    device = reserved + gpu.cuda_context_bytes + gpu_overheads.nccl_bytes(groups)
    return {"allocated_bytes": allocated, "reserved_bytes": reserved, "device_bytes": device}


def summarize_model(spec: ModelSpec, trace: StepTrace, config: PlanConfig, trace_seconds: float) -> ModelSummary:
    num_params = sum(p.numel for p in trace.params)
    trainable = sum(p.numel for p in trace.params if p.grad_storage >= 0)
    if config.run.tp > 1 or config.run.ep > 1 or config.run.pp > 1:  # one rank's shards or stages: count the whole model
        unique = {id(p): p for p in untraced_model(spec).parameters()}.values()
        num_params = sum(p.numel() for p in unique)
        trainable = sum(p.numel() for p in unique if p.requires_grad)
    seq_len, tokens = planned_tokens(spec, config)
    return ModelSummary(
        name=spec.name,
        path=str(spec.path),
        num_params=num_params,
        num_trainable_params=trainable,
        num_units=len(trace.unit_names) - 1,
        unit_names=trace.unit_names[:-1],
        checkpointing=trace.checkpointing,
        top_activation_modules=top_activation_modules(trace, config.run.batch_size),
        trace_seconds=trace_seconds,
        num_traced_ops=trace.num_ops,
        repeated_layers=trace.repeated_layers,
        seq_len=seq_len,
        tokens_per_micro_batch=tokens,
    )


def planned_tokens(spec: ModelSpec, config: PlanConfig) -> tuple[int | None, int | None]:
    """(tokens per sample, tokens per micro-batch) of the batch the plan is for, read off the
    example batch built on the meta device at the plan's micro-batch (None, None: no tokens)."""
    import torch

    from dpplan.planner import fake_device
    from dpplan.training.batch_tokens import tokens_per_micro_batch

    with torch.device("meta"), fake_device.skip_weight_init():
        batch = example_batch_for(spec, config.run.batch_size, config.run.seq_len)
    tokens = tokens_per_micro_batch(batch)
    return (tokens // config.run.batch_size if tokens else None), tokens


def top_activation_modules(trace: StepTrace, batch_size: int, limit: int = TOP_MODULES) -> list[ModuleActivation]:
    """Modules whose forward leaves the most bytes alive for backward (first micro-batch)."""
    backward = trace_index(trace).backward_starts
    if not backward:
        return []
    end_of_forward = backward[0]
    sizes = trace.storage_bytes_at(batch_size)
    alive = np.zeros(len(sizes), dtype=np.int64)
    np.add.at(alive, trace.event_storage[:end_of_forward], trace.event_sign[:end_of_forward])
    kept = (alive > 0) & (trace.storage_category == ACTIVATION) & (trace.storage_module >= 0)
    per_module = np.bincount(trace.storage_module[kept], weights=sizes[kept], minlength=len(trace.module_names))
    order = np.argsort(-per_module)[:limit]
    return [
        ModuleActivation(
            name=trace.module_names[i], class_name=trace.module_classes[i], activation_bytes=int(per_module[i])
        )
        for i in order
        if per_module[i] > 0
    ]
