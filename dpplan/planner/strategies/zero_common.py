"""What DeepSpeed's ZeRO stages share: config defaults, communication dtypes, the optimizer
state of one flat master tensor, where the micro-batches are in a trace, user-facing notes."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from dpplan.planner.no_dynamo import dynamo_untouched
from dpplan.planner.strategies.common import owned_storages
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import AUTOCAST, StepTrace, cached_on_trace
from dpplan.training.optimizers import build_optimizer

# DeepSpeed's ZeRO settings and their defaults: strategies/zero_settings.py (layout.zero).
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
    ``get_all_comm_dtypes``, stage_1_and_2.py and stage3.py __init__). Under torch_autocast the
    parameters of Linear/Conv modules reduce in the autocast dtype, everything else in its own
    dtype; a parameter tied between such a module and another (GPT-2's embedding and head) is
    one tensor, marked by the Linear (``init_autocast_params`` walks every module)."""
    # Only DeepSpeed's torch_autocast section (a trace of the AUTOCAST family) reduces in the
    # autocast dtype; its "bf16"/"fp16" sections reduce in the parameter dtype.
    low = MIXED_PRECISIONS.get(trace.settings.precision) if trace.settings.family == AUTOCAST else None
    sizes = []
    for i in indices:
        param = trace.params[i]
        safe = low is not None and any(c in LOWER_PRECISION_SAFE_CLASSES for c in param.holder_classes)
        sizes.append(low if safe and low is not None else param.itemsize)
    return sizes


def comm_groups(trace: StepTrace, trainable: list[int], pad_to: int = 1) -> list[tuple[int, int]]:
    """(elements, bytes per element) per communication dtype; each parameter's elements padded
    to a multiple of ``pad_to`` (stage 3 pads every parameter to the world size)."""
    groups: dict[int, int] = {}
    for i, size in zip(trainable, comm_sizes(trace, trainable)):
        numel = trace.params[i].numel
        groups[size] = groups.get(size, 0) + -(-numel // pad_to) * pad_to
    return [(numel, size) for size, numel in sorted(groups.items(), reverse=True)]


@dataclass(frozen=True)
class BucketFill:
    """One reduction of a gradient bucket during backward."""

    trigger: int | None
    """The parameter whose hook found the bucket full (the reduction runs before its gradient
    is copied in); None: the epilogue after backward."""
    comm_size: int
    params: tuple[int, ...]
    """The parameters reduced together, in hook order."""
    oversized: bool
    """A lone parameter larger than the bucket: reduced from its own gradient, which lives
    until this reduction (``extra_large_param_to_reduce``)."""


def bucket_fills(trace: StepTrace, order: list[int], bucket_numel: int) -> list[BucketFill]:
    """The reductions of ``reduce_bucket_size``-element buckets as gradients arrive in ``order``:
    one bucket per communication dtype; a gradient that would overflow its bucket first
    reduces what the bucket holds (stage_1_and_2.py and stage3.py
    ``reduce_independent_p_g_buckets_and_remove_grads``); what is left is reduced by the
    epilogue, the buckets in dtype order (``sort_dtypes``: the wider first)."""
    return cached_on_trace(trace, ("bucket fills", tuple(order), bucket_numel),
                           lambda: _bucket_fills(trace, order, bucket_numel))


def _bucket_fills(trace: StepTrace, order: list[int], bucket_numel: int) -> list[BucketFill]:
    members: dict[int, list[int]] = {}
    elements: dict[int, int] = {}
    fills = []

    def fill(trigger, size):
        params = tuple(members[size])
        oversized = len(params) == 1 and trace.params[params[0]].numel > bucket_numel
        fills.append(BucketFill(trigger=trigger, comm_size=size, params=params, oversized=oversized))
        members[size], elements[size] = [], 0

    for i, size in zip(order, comm_sizes(trace, order)):
        numel = trace.params[i].numel
        if members.get(size) and elements[size] + numel > bucket_numel:
            fill(i, size)
        members.setdefault(size, []).append(i)
        elements[size] = elements.get(size, 0) + numel
    for size in sorted(members):  # sort_dtypes sorts by name: bfloat16, float16, float32
        if members[size]:
            fill(None, size)
    return fills


@functools.cache
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


def flat_step_temporaries(timeline: RankTimeline, flat_numel: int) -> None:
    """The traced optimizer-step temporaries, for DeepSpeed's step over one flat fp32 tensor of
    ``flat_numel`` elements (the master slice, or the largest stage-3 sub-group; 0 removes
    them: the step runs on the host). One tensor is stepped, so the temporaries are those of
    one parameter that size: the largest parameter's, resized, and no others."""
    trace = timeline.trace
    owned = owned_storages(trace, "optimizer_temporary")
    if flat_numel == 0:
        timeline.scale_many(owned.storage, np.zeros(len(owned.storage)))
        return
    if not owned.shaped.any():
        return
    shaped = owned.shaped
    largest = int(owned.owner[shaped][np.argmax(owned.numel[shaped])])
    factors = np.where(owned.owner == largest, flat_numel / owned.numel * (FP32_BYTES / owned.element_size), 0.0)
    factors = np.where(shaped, factors, 1.0)  # scalars (Adam's step count) kept
    timeline.scale_many(owned.storage, factors)


def zero_optimizer_state(timeline: RankTimeline) -> None:
    """The traced per-parameter optimizer state is gone (DeepSpeed keeps its own, flat)."""
    owned = owned_storages(timeline.trace, "optimizer_state")
    timeline.scale_many(owned.storage, np.zeros(len(owned.storage)))


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
    bucket = layout.zero.reduce_bucket_size
    if layout.zero.source is not None:
        notes.append(f"{stage}: DeepSpeed settings from {layout.zero.source} (reduce_bucket_size={bucket:,})")
    else:
        notes.append(
            f"{stage}: DeepSpeed's gradient bucket buffers included, reduce_bucket_size={bucket:.0e} "
            "elements each, whatever the model size"
        )
    if layout.offload != "none" and layout.device_type == "cpu":
        notes.append(f"{stage}: on a CPU run the offloaded state is host memory like everything else: "
                     "it is in the peak (host_bytes: per node)")
    if layout.offload == "optimizer+params" and stage != "zero3":
        notes.append("offload_param is a zero3 option: only the optimizer is offloaded")
    return notes
