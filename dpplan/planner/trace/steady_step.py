"""Trace one steady-state training step of one model on the fake device: the tracer
(planner/fake_device/) reports storages, the recorder (planner/trace/recorder.py) labels them,
hooks mark the units (planner/trace/unit_markers.py), and what was recorded becomes a StepTrace
(planner/trace/step_trace.py). Whether a model is traced whole or built from short copies is
decided in planner/trace/full_or_built.py."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from dpplan.planner import fake_device, torch_apis
from dpplan.planner.fake_device.fake_tensor import local_tensor
from dpplan.planner.trace.errors import TraceError, TracerBug, as_trace_failure
from dpplan.planner.trace.fake_mesh import fake_mesh, fake_tp_mesh
from dpplan.planner.trace.pipeline_rank import PipelineStep, trace_pipeline_rank
from dpplan.planner.trace.precision import grad_scaler, prepare_precision
from dpplan.planner.trace.recorder import Recorder, move_births_to_baseline, tensors_in
from dpplan.planner.trace.step_trace import (
    ACTIVATION,
    AUTOCAST,
    BUFFER,
    GRADIENT,
    INPUT,
    OPTIMIZER_STATE,
    OPTIMIZER_TEMPORARY,
    PARAMETER,
    TRACE_BATCH_SIZE,
    ParamInfo,
    StepTrace,
    TraceSettings,
    batch_degree,
)
from dpplan.planner.trace.unit_markers import enter_backward, mark_units, observe_recompute
from dpplan.training.model_file import ModelSpec, example_batch_for
from dpplan.training.optimizers import build_optimizer
from dpplan.training.training_step import autocast_context, run_micro_batch, run_optimizer_step
from dpplan.training.units import checkpoint_units, find_units


def trace_model(
    spec: ModelSpec, model: nn.Module, settings: TraceSettings, batch_size: int, *, units: list[nn.Module] | None = None
) -> StepTrace:
    """Trace one step of ``model`` (built on the meta device, not yet traced): ``spec``
    gives its example batch and loss; ``units``, when given, replaces the units that
    ``settings.wrap`` would pick."""
    torch_apis.check(settings.device_type)
    if settings.pp > 1:
        return trace_pipeline_rank(
            spec, model, settings, batch_size,
            lambda container, stage_units, pipeline, batch: _trace_model(
                spec, container, settings, batch_size, stage_units, pipeline=pipeline, batch=batch),
        )
    if settings.ep > 1:
        return _trace_expert_parallel(spec, model, settings, batch_size, units)
    if settings.tp == 1:
        return _trace_model(spec, model, settings, batch_size, units)
    from dpplan.training.tensor_parallel import apply_tensor_parallel, tensor_parallel_plan

    # torchtitan's order: tensor parallelism first, then checkpointing (then the data-parallel
    # wrapper, which the strategies replay)
    plan = tensor_parallel_plan(model, settings.tp, settings.sequence_parallel, spec.tp_plan)
    with fake_tp_mesh(settings.tp) as mesh:
        apply_tensor_parallel(model, mesh, plan)
        try:
            return _trace_model(spec, model, settings, batch_size, units)
        except TraceError as exc:
            raise TraceError(f"{exc} (with --tp {settings.tp} each rank holds 1/{settings.tp} of every split "
                             "layer and of the heads: a model must reshape by local sizes, e.g. "
                             "view(batch, seq, -1, head_dim); or define tp_plan(model, sequence_parallel))") from None


def _trace_expert_parallel(
    spec: ModelSpec, model: nn.Module, settings: TraceSettings, batch_size: int, units: list[nn.Module] | None
) -> StepTrace:
    """One rank of an expert group: its experts, and the routed pairs a balanced router sends
    it (training/expert_parallel.py says why the counts are assumed)."""
    from dpplan.training.expert_parallel import apply_expert_parallel, balanced_counts

    with fake_mesh(settings.ep, "ep") as mesh:
        experts = apply_expert_parallel(model, mesh, balanced_counts)
        trace = _trace_model(spec, model, settings, batch_size, units, expert_units=experts)
    note = (f"expert parallelism: planned for a balanced router (each of the {settings.ep} ranks of an expert group "
            "receives tokens x top-k / ep routed pairs per MoE layer); a rank its router sends more holds more")
    return replace(trace, notes=(*trace.notes, note))


def _trace_model(
    spec: ModelSpec, model: nn.Module, settings: TraceSettings, batch_size: int, units: list[nn.Module] | None,
    expert_units: list[nn.Module] = (),  # type: ignore[assignment]
    pipeline: PipelineStep | None = None, batch: Any = None,
) -> StepTrace:
    """The trace of ``model``'s step; with ``pipeline``, ``model`` holds a pipeline rank's stages
    and ``batch`` is the step's (every micro-batch's) batch."""
    if batch is None:
        with torch.device("meta"), fake_device.skip_weight_init():
            batch = example_batch_for(spec, batch_size, settings.seq_len)
    if units is None:
        units = find_units(model, settings.wrap)
    recorder = Recorder()
    checkpointing = "none"
    if settings.activation_checkpointing:
        checkpointing = checkpoint_units(model, units, observe=lambda u, fwd: observe_recompute(recorder, u, fwd))
    # Experts modules are FSDP units of their own inside their layers' (never checkpointed
    # twice); listed first, each owns its parameters (_unit_of_params: the first unit holding one).
    units = [*expert_units, *units]
    batch = prepare_precision(model, batch, settings)

    def location() -> str:
        module = recorder.module_stack[-1]
        return f"{module_names[module]} ({module_classes[module]})" if module >= 0 else ""

    tracer = fake_device.StorageTracer(
        lambda k, n: recorder.alloc(k, n), lambda k: recorder.free(k), target_device_type=settings.device_type,
        # CPU kernels' buffers are fitted to the batch where the trace batch is the prime that
        # marks batch dims; a step traced at a real batch has them measured at that batch.
        trace_batch_size=batch_size if batch_size == TRACE_BATCH_SIZE else 1,
        kernel_batch_size=settings.kernel_batch_size,
    )
    tracer.location = location
    if settings.cp > 1:
        from dpplan.planner.context_parallel import ring_attention_steps

        tracer.op_steps = ring_attention_steps(settings.cp)
    tracer.on_merge = recorder.merge
    tracer.on_sum_into = recorder.sum_into
    module_index: dict[int, int] = {}
    module_names: list[str] = []
    module_classes: list[str] = []
    for name, sub in model.named_modules():
        module_index[id(sub)] = len(module_names)
        module_names.append(name or "(root)")
        module_classes.append(type(sub).__name__)

    # The generator state checkpointing keeps is host memory: it counts on a CPU target only.
    rng_state = (
        fake_device.host_rng_state_as_traced_tensor()
        if settings.device_type == "cpu" and checkpointing != "none"
        else contextlib.nullcontext()
    )
    try:
        with tracer, rng_state:
            fake_device.module_to_fake_device(model)
            batch = fake_device.tree_to_fake_device(batch)
            optimizer = build_optimizer(settings.optimizer, model.parameters(), device_type=settings.device_type)
            scaler = grad_scaler(settings)
            if pipeline is not None:
                pipeline.build()
            trace = _trace_steady_step(
                spec, model, units, batch, optimizer, scaler, settings, recorder, tracer,
                module_index, module_names, module_classes, checkpointing, batch_size, pipeline,
            )
            if settings.cp > 1:
                from dpplan.planner.context_parallel import NOTE

                trace = replace(trace, notes=(*trace.notes, NOTE))
            return replace(trace, expert_units=tuple(range(len(expert_units)))) if expert_units else trace
    except Exception as exc:
        failure = as_trace_failure(exc, spec)
        if failure is exc:
            raise
        raise failure from (exc if isinstance(failure, TracerBug) else None)


def _pipeline_autocast(settings: TraceSettings):
    return autocast_context(settings.precision, "cpu", settings.family == AUTOCAST)


def _trace_steady_step(
    spec, model, units, batch, optimizer, scaler, settings, recorder, tracer,
    module_index, module_names, module_classes, checkpointing, batch_size, pipeline=None,
) -> StepTrace:
    # -- what exists when the step starts ---------------------------------------------------
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    param_names: list[str] = []
    for name, param in model.named_parameters():
        if id(param) not in seen:
            seen.add(id(param))
            params.append(param)
            param_names.append(name)
    recorder.recording = True

    def adopt(tensor: torch.Tensor, category: int) -> None:
        tensor = local_tensor(tensor)
        key = tensor.untyped_storage()._cdata
        if key in recorder.live:
            return
        recorder.phase = category
        tracer.adopt(tensor)

    # Start a clean record: what is alive now is the baseline, labelled by what it is.
    recorder.__init__()
    recorder.recording = True
    for i, param in enumerate(params):
        adopt(param, PARAMETER)
        recorder.storage_owner[recorder.storage_of(param)] = i
    # A buffer is labelled with its module, so that a layer's buffers are known as its own.
    seen_buffers: set[int] = set()
    for sub in model.modules():
        for buf in sub._buffers.values():
            if buf is not None and id(buf) not in seen_buffers:
                seen_buffers.add(id(buf))
                adopt(buf, BUFFER)
                recorder.storage_module[recorder.storage_of(buf)] = module_index.get(id(sub), -1)
    for i, param in enumerate(params):
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor):
                adopt(value, OPTIMIZER_STATE)
                recorder.storage_owner[recorder.storage_of(value)] = i
    if scaler is not None:
        for value in vars(scaler).values():
            if isinstance(value, torch.Tensor):
                adopt(value, OPTIMIZER_STATE)
    for leaf in tensors_in(batch):
        adopt(leaf, INPUT)
    num_baseline = len(recorder.event_storage)

    # -- markers ----------------------------------------------------------------------------
    root_unit = len(units)
    unit_names = [_qualified(module_names, module_index, u) for u in units] + ["(root)"]
    handles = mark_units(recorder, model, units, module_index, pipeline=pipeline is not None)

    param_index = {id(p): i for i, p in enumerate(params)}
    grad_storage = [-1] * len(params)

    def on_grad(param):
        # A post-accumulate-grad hook: AccumulateGrad has just made or summed into ``.grad``.
        i = param_index[id(param)]
        grad = recorder.storage_of(param.grad) if param.grad is not None else -1
        recorder.mark("grad", i, storage=recorder.summed_into.pop(grad, -1))
        if grad_storage[i] < 0:
            grad_storage[i] = grad

    for param in params:
        if param.requires_grad:
            handles.append(param.register_post_accumulate_grad_hook(on_grad))

    # -- the step ---------------------------------------------------------------------------
    try:
        if pipeline is not None:
            recorder.mark("micro_batch", 0)
            recorder.mark("fwd_start", root_unit)
            recorder.phase = ACTIVATION

            def on_forward():
                recorder.mark("pipeline_forward")
                recorder.phase = ACTIVATION

            pipeline.run(batch, _pipeline_autocast(settings), on_forward, lambda: enter_backward(recorder),
                         lambda: recorder.mark("reduce_grad"))
            recorder.mark("bwd_end", root_unit)
        for micro in range(settings.num_micro_batches if pipeline is None else 0):
            recorder.mark("micro_batch", micro)
            recorder.mark("fwd_start", root_unit)
            recorder.phase = ACTIVATION
            run_micro_batch(
                model, batch, spec.loss_fn,
                grad_accum=settings.grad_accum,
                autocast=autocast_context(settings.precision, "cpu", settings.family == AUTOCAST),
                grad_scaler=scaler,
                before_backward=lambda: enter_backward(recorder),
            )
            recorder.mark("bwd_end", root_unit)
        recorder.phase_boundary()
        recorder.phase = OPTIMIZER_TEMPORARY
        recorder.mark("optimizer")
        for i, param in enumerate(params):
            if param.grad is not None:
                grad = recorder.storage_of(param.grad)
                recorder.storage_category[grad] = GRADIENT
                recorder.storage_owner[grad] = i
        recorder.born_in_op = []
        tracer.on_op_done = recorder.attribute_outputs
        run_optimizer_step(optimizer, scaler)
        tracer.on_op_done = None
        recorder.mark("end")
    finally:
        for handle in handles:
            handle.remove()

    # Optimizer state created in this step (lazily) is state, not temporary, and from the
    # second step on it exists before the step starts; so are a pipeline stage's receive buffers
    # (made for every micro-batch at the first step, kept: planner/trace/pipeline_rank.py).
    persistent: set[int] = set()
    if pipeline is not None:
        for buffer in pipeline.receive_buffers():
            key = local_tensor(buffer).untyped_storage()._cdata
            if key in recorder.live:
                persistent.add(recorder.live[key])
    for i, param in enumerate(params):
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and local_tensor(value).untyped_storage()._cdata in recorder.live:
                index = recorder.storage_of(value)
                recorder.storage_category[index] = OPTIMIZER_STATE
                recorder.storage_owner[index] = i
                persistent.add(index)
    if scaler is not None:
        for value in vars(scaler).values():
            if isinstance(value, torch.Tensor) and local_tensor(value).untyped_storage()._cdata in recorder.live:
                index = recorder.storage_of(value)
                recorder.storage_category[index] = OPTIMIZER_STATE
                persistent.add(index)
    num_baseline = move_births_to_baseline(recorder, persistent, num_baseline)
    for i, index in enumerate(grad_storage):
        if index >= 0:
            recorder.storage_category[index] = GRADIENT
            recorder.storage_owner[index] = i

    unit_of_param = _unit_of_params(model, units, params, root_unit)
    holders: dict[int, list[str]] = {}
    for sub in model.modules():
        for held in sub._parameters.values():
            if held is not None:
                holders.setdefault(id(held), []).append(type(sub).__name__)
    storage_bytes = np.asarray(recorder.storage_bytes, dtype=np.int64)
    param_infos = [
        ParamInfo(
            name=param_names[i],
            numel=local_tensor(p).numel(),
            itemsize=p.element_size(),
            shape=tuple(local_tensor(p).shape),
            unit=unit_of_param[i],
            storage=recorder.live.get(local_tensor(p).untyped_storage()._cdata, -1),
            grad_storage=grad_storage[i],
            holder_classes=tuple(holders.get(id(p), ())),
        )
        for i, p in enumerate(params)
    ]
    return StepTrace(
        settings=settings,
        trace_batch_size=batch_size,
        event_storage=np.asarray(recorder.event_storage, dtype=np.int64),
        event_sign=np.asarray(recorder.event_sign, dtype=np.int64),
        storage_bytes=storage_bytes,
        storage_batch_degree=batch_degree(storage_bytes, batch_size),
        storage_category=np.asarray(recorder.storage_category, dtype=np.int64),
        storage_module=np.asarray(recorder.storage_module, dtype=np.int64),
        storage_owner=np.asarray(recorder.storage_owner, dtype=np.int64),
        num_baseline_events=num_baseline,
        markers=recorder.markers,
        params=param_infos,
        unit_names=unit_names,
        module_names=module_names,
        module_classes=module_classes,
        num_ops=tracer.num_ops,
        checkpointing=checkpointing,
        notes=tuple(f"{note} ({count} calls)" if count > 1 else note for note, count in tracer.notes.items()),
    )


def _qualified(module_names, module_index, module) -> str:
    return module_names[module_index[id(module)]]


def _unit_of_params(model, units, params, root_unit) -> list[int]:
    owner: dict[int, int] = {}
    for u, unit in enumerate(units):
        for p in unit.parameters():
            owner.setdefault(id(p), u)
    return [owner.get(id(p), root_unit) for p in params]
