"""single: one device, no wrapper. The traced step is exactly what one rank does."""

from __future__ import annotations

from dpplan.planner.strategies.common import mesh_process_groups, wraps_every_model
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import RankPlan
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import StepTrace

process_groups = mesh_process_groups  # one rank: none
refusal = wraps_every_model


def plan_rank(trace: StepTrace, layout: Layout) -> RankPlan:
    return RankPlan(timeline=RankTimeline(trace))


def ranks_to_evaluate(trace: StepTrace, layout: Layout) -> list[int]:
    return [0]
