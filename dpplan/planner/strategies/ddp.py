"""ddp: DistributedDataParallel with torch's defaults.

Memory beyond the unwrapped step: the reducer's gradient buckets. With the default
``gradient_as_bucket_view=False`` the reducer allocates, at construction, one flat bucket
tensor per ~25 MiB group of parameters (``bucket_cap_mb=25``), together as large as all
gradients, and copies each gradient into it as it becomes ready
(torch/csrc/distributed/c10d/reducer.cpp, ``Reducer::initialize_buckets``; PR #41954 on
``gradient_as_bucket_view``: "peak memory dropped ~1GB" on a 1 GB model). Gradients stay
where autograd put them, so the rest of the step is unchanged and the peak does not depend
on the number of ranks (measured on CPU: +1.000x parameter bytes, exactly).
"""

from __future__ import annotations

from dpplan.planner.strategies.common import mesh_process_groups, wraps_every_model
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import RankPlan
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import GRADIENT, StepTrace

process_groups = mesh_process_groups
refusal = wraps_every_model


def gradient_bucket_bytes(trace: StepTrace) -> int:
    """Bytes of DDP's buckets: one slot per element of every trainable parameter."""
    return sum(p.numel * p.itemsize for p in trace.params if p.grad_storage >= 0)


def add_gradient_buckets(timeline: RankTimeline) -> None:
    timeline.insert(0, gradient_bucket_bytes(timeline.trace), GRADIENT)


def plan_rank(trace: StepTrace, layout: Layout) -> RankPlan:
    timeline = RankTimeline(trace)
    add_gradient_buckets(timeline)
    return RankPlan(timeline=timeline)


def ranks_to_evaluate(trace: StepTrace, layout: Layout) -> list[int]:
    return [0]
