"""Per-strategy memory lifecycles, replayed over the traced step (see planner/timeline.py).

Each strategy module exposes ``plan_rank(trace, layout) -> RankTimeline`` for one rank and
``ranks_to_evaluate(trace, layout) -> list[int]``: the ranks whose peaks can differ (the
estimate reports the largest).
"""

from __future__ import annotations

from dpplan.planner.strategies.layout import STRATEGIES, Layout, strategy_module

__all__ = ["STRATEGIES", "Layout", "strategy_module"]
