"""Trace one pipeline rank: its stages of the model, run by torch's own schedule on a fake
process group, so that the plan holds what the schedule holds (training/pipeline_parallel.py):
each in-flight micro-batch's saved activations, the receive buffers a stage allocates once for
every micro-batch and keeps between steps, the input gradients it sends back.

How one process plays one rank of ``pp`` (x ``tp``):
  - the model is built on meta and cut into all its stages; the boundary shapes of one
    micro-batch come from running them in order on meta (the static metadata every
    ``PipelineStage`` is given, real runs too);
  - the rank's stages (with tensor parallelism first, on the fake mesh's tp dimension, then
    checkpointing) go to the fake device, the schedule is built over the fake pp group, whose
    sends and receives return at once (torch/testing/_internal/distributed/fake_pg.py);
  - torch's warm-up vote (a P2P exchange of a flag, read with ``.item()``) is skipped: with
    static metadata on every stage its outcome is STATIC (torch/distributed/pipelining/
    schedules.py ``_warmup_p2p``);
  - the traced step is the first: what it makes that a later step finds made (the receive
    buffers, one per micro-batch, and the optimizer state) is moved to the baseline. The one
    difference from a later step is left out: a later step starts with the previous step's input
    gradients still on the receive buffers, and frees them first (``clear_runtime_states``),
    before anything is allocated, so they never add to a peak.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from dpplan.planner.trace.errors import TraceError
from dpplan.planner.trace.step_trace import PARAM_CAST, StepTrace, TraceSettings
from dpplan.training.model_file import ModelSpec, example_batch_for
from dpplan.training.pipeline_layout import PipelineLayout
from dpplan.training.units import find_units


def pipeline_layout_of(settings: TraceSettings) -> PipelineLayout:
    return PipelineLayout(pp=settings.pp, schedule=settings.pp_schedule, num_micro_batches=settings.grad_accum)


@dataclass
class PipelineStep:
    """What steady_step.py asks of a pipeline rank's trace: the micro-batches' batch size, the
    schedule to build once the stages are on the fake device, and the step to run."""

    layout: PipelineLayout
    stage_indices: tuple[int, ...]
    stages: list[nn.Module]
    shapes: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable
    device_type: str
    group: Any
    schedule: Any = None

    def build(self) -> None:
        from dpplan.training.pipeline_parallel import build_schedule

        self.schedule = build_schedule(self.stages, self.stage_indices, self.layout, self.shapes, self.loss_fn,
                                       torch.device("cpu"), group=self.group)
        self.schedule._warmup_p2p = _static_vote

    def run(self, batch: Any, autocast: contextlib.AbstractContextManager,
            on_forward: Callable[[], None] | None = None, on_backward: Callable[[], None] | None = None,
            on_reduce_grad: Callable[[], None] | None = None) -> None:
        from dpplan.training.pipeline_parallel import pipeline_batch, run_pipeline_step

        handles = _phase_hooks(self.schedule, on_forward, on_backward, on_reduce_grad) + [_works_hold_tensors()]
        try:
            inputs, target = pipeline_batch(batch)
            run_pipeline_step(self.schedule, self.layout, self.stage_indices, inputs, target, autocast=autocast)
        finally:
            for restore in handles:
                restore()

    def receive_buffers(self) -> list[torch.Tensor]:
        """The buffers the stages receive activations and gradients into: one per micro-batch,
        made at the first step and kept (``_prepare_forward_infra``/``_prepare_backward_infra``)."""
        held = []
        for stage in self._stage_objects():
            for infos in [*stage.args_recv_info.values(), *getattr(stage, "grad_recv_info", {}).values()]:
                for info in infos:
                    buffer = getattr(info, "buffer", None)
                    if isinstance(buffer, torch.Tensor):
                        held.append(buffer)
        return held

    def _stage_objects(self) -> list:
        schedule = self.schedule
        return list(getattr(schedule, "_stages", None) or [schedule._stage])


class _HeldWork:
    """A fake process group's P2P work, holding its tensors as a real backend's work does
    (gloo's send and recv work keep their tensors until the work object is gone, c10d
    ProcessGroupGloo's ``SendWork``/``RecvWork``): a sent activation or input gradient lives
    until the schedule drops the work, not only until the send returns."""

    def __init__(self, work, tensors):
        self.work, self.tensors = work, tensors

    def wait(self, *args, **kwargs):
        return self.work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.work, name)


def _works_hold_tensors() -> Callable[[], None]:
    """Make the schedules' P2P works hold their tensors for the step; returns the undo."""
    from torch.distributed.pipelining import schedules

    original = schedules._batch_p2p

    def batch_p2p(p2p_ops, desc=None):
        works = original(p2p_ops, desc=desc)
        if len(works) == len(p2p_ops):
            return [_HeldWork(w, [op.tensor]) for w, op in zip(works, p2p_ops)]
        return [_HeldWork(w, [op.tensor for op in p2p_ops]) for w in works]

    schedules._batch_p2p = batch_p2p

    def undo():
        schedules._batch_p2p = original

    return undo


def _static_vote(stages, has_backward, p2p_done) -> None:
    from torch.distributed.pipelining.stage import InferenceMode

    for stage in stages:
        stage._inference_mode = InferenceMode.STATIC


def _phase_hooks(schedule, on_forward, on_backward, on_reduce_grad=None) -> list[Callable[[], None]]:
    """Call ``on_forward`` / ``on_backward`` as each stage starts a micro-batch's forward or
    backward (the plan's peak phase), and ``on_reduce_grad`` where the schedule calls the
    stage's ``perform_reduce_grad`` after its last backward (FSDP2's gradient reduction,
    strategies/fsdp2_pipeline.py), by wrapping the stages' methods for the step."""
    restores: list[Callable[[], None]] = []
    stages = list(getattr(schedule, "_stages", None) or [schedule._stage])
    for stage in stages:
        for name, hook in (("forward_one_chunk", on_forward), ("backward_one_chunk", on_backward),
                           ("backward_weight_one_chunk", on_backward), ("perform_reduce_grad", on_reduce_grad)):
            if hook is None or not hasattr(stage, name):
                continue
            original = getattr(stage, name)

            def wrapped(*args, _original=original, _hook=hook, **kwargs):
                _hook()
                return _original(*args, **kwargs)

            setattr(stage, name, wrapped)
            restores.append(functools.partial(delattr, stage, name))
    return restores


_MESH_NUMBERS = itertools.count()


@contextlib.contextmanager
def fake_pipeline_mesh(pp: int, tp: int, pp_rank: int) -> Iterator[dict]:
    """The pp and tp meshes of the first tp rank of pipeline rank ``pp_rank`` on a (pp, tp)
    grid of fake ranks (tp innermost, torchtitan's order). Each is made from its ranks, not
    sliced from a 2-D mesh (torch caches a 2-D mesh's slices across process groups), and named
    uniquely: DTensor's caches keep meshes past their process groups, and a later mesh equal to
    a cached one (same ranks, same name) would be handed a destroyed group (measured: "Could not
    resolve the process group registered under the name 2" in the next plan's tp trace)."""
    from torch.distributed.device_mesh import DeviceMesh

    from dpplan.planner.trace.fake_mesh import fake_process_group

    rank = pp_rank * tp
    number = next(_MESH_NUMBERS)
    with fake_process_group(pp * tp, rank):
        meshes = {"pp": DeviceMesh("cpu", torch.arange(pp) * tp + rank % tp, mesh_dim_names=(f"pp_{number}",))}
        if tp > 1:
            meshes["tp"] = DeviceMesh("cpu", torch.arange(tp) + rank, mesh_dim_names=(f"tp_{number}",))
        yield meshes


def _compute_dtype_boundaries(shapes: list, settings: TraceSettings) -> list:
    """Under FSDP2 mixed precision the stages compute in the low dtype (MixedPrecisionPolicy, no
    autocast), so their floating boundaries are low-precision, as the real run's static
    metadata (profiler/pipeline_run.py builds it from a bf16 meta model)."""
    from dpplan.training.training_step import LOW_PRECISION_DTYPE

    low = LOW_PRECISION_DTYPE.get(settings.precision)
    if settings.family != PARAM_CAST or low is None:
        return shapes

    def cast(meta: torch.Tensor) -> torch.Tensor:
        return meta.to(low) if meta.is_floating_point() else meta

    return [(cast(x), cast(out)) for x, out in shapes]


def stage_description(stage_index: int, num_stages: int, layers: range) -> list[str]:
    """What a stage owns by the pipeline contract: the embedding on the first, its layers, the
    final norm and head on the last."""
    owns = ["embedding"] if stage_index == 0 else []
    if len(layers):
        owns.append(f"layer {layers.start}" if len(layers) == 1 else f"layers {layers.start}-{layers.stop - 1}")
    if stage_index == num_stages - 1:
        owns.append("head")
    return owns


def trace_pipeline_rank(
    spec: ModelSpec, model: nn.Module, settings: TraceSettings, batch_size: int,
    trace_stages: Callable[..., StepTrace],
) -> StepTrace:
    """Trace pipeline rank ``settings.pp_rank`` of ``model`` (built on meta, untraced);
    ``trace_stages(container, units, pipeline, batch)`` is steady_step's tracer."""
    from dpplan.training import pipeline_parallel as pipe

    layout = pipeline_layout_of(settings)
    indices = layout.stages_of(settings.pp_rank)
    num_layers = len(find_units(model, settings.wrap))
    all_stages = [pipe.stage_module(spec, model, i, layout.num_stages) for i in range(layout.num_stages)]
    with torch.device("meta"):
        batch = example_batch_for(spec, batch_size * layout.num_micro_batches, settings.seq_len)
    inputs, _ = pipe.pipeline_batch(batch)
    try:
        shapes = pipe.boundary_shapes(all_stages, inputs.tensor_split(layout.num_micro_batches)[0])
    except pipe.PipelineError:
        raise
    except Exception as exc:  # the model's own stage forward failed on meta
        raise TraceError(f"--pp: running the pipeline stages in order failed: {type(exc).__name__}: {exc}") from None
    shapes = _compute_dtype_boundaries(shapes, settings)
    container = nn.ModuleDict({f"stage{i}": all_stages[i] for i in indices})
    with fake_pipeline_mesh(settings.pp, settings.tp, settings.pp_rank) as mesh:
        if settings.tp > 1:
            from dpplan.training.tensor_parallel import apply_tensor_parallel, tensor_parallel_plan

            for i in indices:
                plan = tensor_parallel_plan(all_stages[i], settings.tp, settings.sequence_parallel, spec.tp_plan)
                apply_tensor_parallel(all_stages[i], mesh["tp"], plan)
        units = [u for i in indices for u in pipe.stage_units(all_stages[i], settings.wrap)]
        pipeline = PipelineStep(
            layout=layout, stage_indices=indices, stages=[all_stages[i] for i in indices], shapes=shapes,
            loss_fn=pipe.stage_loss(spec, model), device_type=settings.device_type,
            group=mesh["pp"].get_group(),
        )
        trace = trace_stages(container, units, pipeline, batch)
    ranges = pipe.split_layers(num_layers, layout.num_stages) if num_layers >= layout.num_stages else None
    owns = [part for i in indices
            for part in stage_description(i, layout.num_stages, ranges[i] if ranges else range(0))]
    return replace(trace, pipeline_stages=indices, pipeline_owns=tuple(owns))
