"""single: one device, no wrapper. The traced step is exactly what one rank does."""

from __future__ import annotations

from dpplan.planner.strategies.layout import Layout
from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import StepTrace


def plan_rank(trace: StepTrace, layout: Layout) -> RankTimeline:
    return RankTimeline(trace)


def ranks_to_evaluate(trace: StepTrace, layout: Layout) -> list[int]:
    return [0]
