"""What DeepSpeed's ZeRO stages share: config defaults, communication dtypes, the optimizer
state of one flat master tensor, where the micro-batches are in a trace, user-facing notes."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from dpplan.planner.no_dynamo import dynamo_untouched
from dpplan.planner.optimizers import build_optimizer
from dpplan.planner.strategies.common import ParamStorages, owned_storages, resize_owned_storages
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import AUTOCAST, StepTrace, cached_on_trace

# DeepSpeedZeroConfig defaults (deepspeed/runtime/zero/config.py). ``overlap_comm`` defaults to
# True at stage 3 only (``overlap_comm_valid``); contiguous_gradients=True, reduce_scatter=True.
REDUCE_BUCKET_NUMEL = 500_000_000  # reduce_bucket_size
PREFETCH_BUCKET_NUMEL = 50_000_000  # stage3_prefetch_bucket_size
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters
MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance
PARAM_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold
# stage_1_and_2.py: ``nccl_start_alignment_factor = 2`` (the flat buffer is padded to a
# multiple of 2 * dp_size elements).
MASTER_ALIGNMENT_FACTOR = 2
FP32_BYTES = 4
# deepspeed/runtime/torch_autocast.py LOWER_PRECISION_SAFE_MODULES: parameters of these
# modules get ``comm_dtype`` = the autocast dtype; all others communicate in their own dtype.
LOWER_PRECISION_SAFE_CLASSES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
MIXED_PRECISIONS = {"bf16-mixed": 2, "fp16-mixed": 2}


def comm_sizes(trace: StepTrace, indices: list[int]) -> list[int]:
    return cached_on_trace(trace, ("comm sizes", tuple(indices)), lambda: _comm_sizes(trace, indices))


def _comm_sizes(trace: StepTrace, indices: list[int]) -> list[int]:
    """Bytes per element each parameter's gradient is reduced in.

    DeepSpeed keeps one gradient bucket per communication dtype (``ipg_buckets`` keyed by
    ``get_all_comm_dtypes``, stage_1_and_2.py and stage3.py __init__). Under torch_autocast
    Linear/Conv weights reduce in the autocast dtype, everything else in its own dtype; tied
    parameters are attributed to the module they are first named under."""
    # Only DeepSpeed's torch_autocast section (a trace of the AUTOCAST family) reduces in the
    # autocast dtype; its "bf16"/"fp16" sections reduce in the parameter dtype.
    low = MIXED_PRECISIONS.get(trace.settings.precision) if trace.settings.family == AUTOCAST else None
    module_index = {name: i for i, name in enumerate(trace.module_names)}
    sizes = []
    for i in indices:
        param = trace.params[i]
        module = param.name.rsplit(".", 1)[0] if "." in param.name else "(root)"
        cls = trace.module_classes[module_index[module]] if module in module_index else ""
        sizes.append(low if (low is not None and cls in LOWER_PRECISION_SAFE_CLASSES) else param.itemsize)
    return sizes


def comm_groups(trace: StepTrace, trainable: list[int], pad_to: int = 1) -> list[tuple[int, int]]:
    """(elements, bytes per element) per communication dtype; each parameter's elements padded
    to a multiple of ``pad_to`` (stage 3 pads every parameter to the world size)."""
    groups: dict[int, int] = {}
    for i, size in zip(trainable, comm_sizes(trace, trainable)):
        numel = trace.params[i].numel
        groups[size] = groups.get(size, 0) + -(-numel // pad_to) * pad_to
    return [(numel, size) for size, numel in sorted(groups.items(), reverse=True)]


@functools.lru_cache(maxsize=None)
def _flat_state_coefficients(optimizer: str) -> tuple[float, float]:
    """Bytes per element and constant bytes of the optimizer's state for one 1-D fp32 tensor,
    measured by stepping torch's optimizer on two small tensors (a 1-D tensor is what DeepSpeed
    hands it: Adafactor, for instance, keeps a full variance instead of row/column factors)."""
    totals = []
    sizes = (1024, 2048)
    with dynamo_untouched():  # the optimizer would import torch._dynamo only to do nothing
        for numel in sizes:
            param = torch.nn.Parameter(torch.zeros(numel))
            param.grad = torch.zeros(numel)
            opt = build_optimizer(optimizer, [param], device_type="cpu")
            opt.step()
            totals.append(sum(v.untyped_storage().nbytes() for v in opt.state[param].values() if torch.is_tensor(v)))
    per_element = (totals[1] - totals[0]) / (sizes[1] - sizes[0])
    return per_element, totals[0] - per_element * sizes[0]


def flat_state_bytes(optimizer: str, numel: int) -> int:
    per_element, constant = _flat_state_coefficients(optimizer)
    return int(round(per_element * numel + constant))


def scale_step_temporaries(timeline: RankTimeline, by_param: list[ParamStorages], fraction: float) -> None:
    """The traced optimizer-step temporaries, for a step over ``fraction`` of each parameter
    in fp32 (DeepSpeed steps the fp32 master slice; 0 removes them: the step runs on the host)."""
    trace = timeline.trace
    owned = owned_storages(trace, "optimizer_temporary")
    if fraction == 0.0:
        timeline.scale_many(owned.storage, np.zeros(len(owned.storage)))
        return
    numels, itemsizes = _param_numels_and_itemsizes(trace)
    element = np.where(itemsizes != FP32_BYTES, FP32_BYTES, 0)
    resize_owned_storages(timeline, owned, numels * fraction, element)


def zero_optimizer_state(timeline: RankTimeline) -> None:
    """The traced per-parameter optimizer state is gone (DeepSpeed keeps its own, flat)."""
    owned = owned_storages(timeline.trace, "optimizer_state")
    timeline.scale_many(owned.storage, np.zeros(len(owned.storage)))


def _param_numels_and_itemsizes(trace: StepTrace) -> tuple[np.ndarray, np.ndarray]:
    return cached_on_trace(trace, "param numels and itemsizes", lambda: (
        np.asarray([p.numel for p in trace.params], dtype=np.int64),
        np.asarray([p.itemsize for p in trace.params], dtype=np.int64),
    ))


@dataclass(kw_only=True)
class MicroBatchSpan:
    """Marker positions of one traced micro-batch."""

    start: int
    first_grad: int = -1
    backward_end: int = -1
    grad_position: dict[int, int] = field(default_factory=dict)
    fwd_start: dict[int, int] = field(default_factory=dict)
    fwd_end: dict[int, int] = field(default_factory=dict)
    bwd_start: dict[int, int] = field(default_factory=dict)
    bwd_end: dict[int, int] = field(default_factory=dict)
    recompute_start: dict[int, int] = field(default_factory=dict)


def micro_batch_spans(trace: StepTrace) -> list[MicroBatchSpan]:
    """Marker positions of each traced micro-batch (shared per trace: read-only)."""
    return cached_on_trace(trace, "micro-batch spans", lambda: _micro_batch_spans(trace))


def _micro_batch_spans(trace: StepTrace) -> list[MicroBatchSpan]:
    root = len(trace.unit_names) - 1
    spans: list[MicroBatchSpan] = []
    for marker in trace.markers:
        if marker.kind == "micro_batch":
            spans.append(MicroBatchSpan(start=marker.event))
            continue
        if not spans or marker.kind in ("optimizer", "end"):
            continue
        span = spans[-1]
        if marker.kind == "grad":
            if span.first_grad < 0:
                span.first_grad = marker.event
            span.grad_position.setdefault(marker.index, marker.event)
        elif marker.kind == "bwd_end" and marker.index == root:
            span.backward_end = marker.event
        elif marker.kind in ("fwd_start", "fwd_end", "bwd_start", "bwd_end", "recompute_start"):
            getattr(span, marker.kind).setdefault(marker.index, marker.event)
    for span in spans:
        if span.first_grad < 0:
            span.first_grad = span.backward_end
    return spans


def notes_for(trace: StepTrace, layout: Layout) -> list[str]:
    stage = layout.strategy
    notes = []
    section = {"bf16-mixed": "bf16", "bf16": "bf16", "fp16-mixed": "fp16"}.get(layout.precision)
    if section is not None and trace.settings.family == AUTOCAST and layout.precision in MIXED_PRECISIONS:
        notes.append(
            f"{stage}: DeepSpeed torch_autocast: fp32 parameters, fp32 master slice and "
            "optimizer state, Linear/Conv gradients reduced in the autocast dtype"
        )
    elif section is not None:
        buffers = "buffers in bf16 too" if layout.precision == "bf16" else "buffers kept in fp32"
        notes.append(
            f'{stage}: DeepSpeed "{section}": {section} parameters and gradients ({buffers}), '
            "an fp32 master partition and fp32 optimizer state"
        )
    notes.append(
        f"{stage}: DeepSpeed's gradient bucket buffers included, reduce_bucket_size={REDUCE_BUCKET_NUMEL:.0e} "
        "elements each, whatever the model size"
    )
    if layout.offload == "optimizer+params" and stage != "zero3":
        notes.append("offload_param is a zero3 option: only the optimizer is offloaded")
    return notes
