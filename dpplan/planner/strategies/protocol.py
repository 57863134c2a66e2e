"""The contract every strategy fulfils, and what planning one rank returns.

A plan is a mesh (strategies/mesh.py) plus the transforms on its axes, of two kinds, peers:
  - **state transforms** replay the traced step on a ``RankTimeline`` with what a wrapper
    does to parameters, gradients and optimizer state over the data-parallel axes (DDP, ZeRO,
    FSDP, offload): the strategy modules in this package, each a ``StrategyPlanner``;
  - **program transforms** change the traced program itself before it is replayed: tensor,
    sequence and expert parallelism shard the ops of a layer, a pipeline stage keeps only its
    layers. They take a trace and the rank's mesh coordinates and give the trace that rank
    runs (``ProgramTransform``); a state transform then replays that trace.
The registry (strategies/registry.py) names each strategy's module; the planner calls only
these functions, and reads only ``RankPlan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dpplan.planner.gpu_overheads import ProcessGroup
    from dpplan.planner.strategies.layout import Layout
    from dpplan.planner.timeline import RankTimeline
    from dpplan.planner.trace import StepTrace


@dataclass(frozen=True, kw_only=True)
class RankPlan:
    """One rank's memory over the step under a strategy."""

    timeline: RankTimeline
    notes: tuple[str, ...] = ()
    """What the user should know about how this was planned (shown beside the estimate)."""
    host_bytes: int | None = None
    """Host RAM per node that offload needs; None without offload."""


class StrategyPlanner(Protocol):
    """The functions a strategy module defines (each module is one, structurally)."""

    def plan_rank(self, trace: StepTrace, layout: Layout) -> RankPlan:
        """Replay ``trace`` as rank ``layout.rank`` runs it under this strategy."""
        ...

    def ranks_to_evaluate(self, trace: StepTrace, layout: Layout) -> list[int]:
        """The ranks whose peaks can differ: the estimate reports the largest of them."""
        ...

    def process_groups(self, layout: Layout) -> list[ProcessGroup]:
        """The communicators a rank creates (their NCCL buffers are device memory)."""
        ...

    def refusal(self, model) -> str | None:
        """What the real wrapper says when it refuses ``model`` (None: it wraps it)."""
        ...


class ProgramTransform(Protocol):
    """Changes the traced program for one rank of a mesh axis (tensor/sequence/expert
    parallelism, pipeline stage selection). Not used yet: tensor and expert parallelism are
    applied to the model before the trace (planner/trace/steady_step.py); a mesh with cp or
    pp > 1 is refused by ``Layout``."""

    axis: str
    """The mesh axis it acts on (``tp``, ``cp``, ``ep``, ``pp``)."""

    def apply(self, trace: StepTrace, layout: Layout) -> StepTrace:
        """The trace rank ``layout.rank`` runs."""
        ...

