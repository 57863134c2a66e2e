"""Per-strategy memory lifecycles, replayed over the traced step (see planner/timeline.py).

registry.py declares every strategy; each strategy module is a ``StrategyPlanner``
(protocol.py): ``plan_rank(trace, layout) -> RankPlan`` for one rank of a mesh (mesh.py,
layout.py), the ranks whose peaks can differ, its process groups, and what its real wrapper
refuses.
"""

from __future__ import annotations

from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.mesh import Mesh
from dpplan.planner.strategies.registry import STRATEGIES, planner_of, strategy_info

__all__ = ["STRATEGIES", "Layout", "Mesh", "planner_of", "strategy_info"]
