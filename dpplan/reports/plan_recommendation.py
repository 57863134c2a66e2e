"""A plan's recommendation, headroom and nodes in words, shared by the terminal table and the
HTML report. The numbers come from the plan (planner/recommendation.py picks the estimate);
nothing is computed here beyond units.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from dpplan.config import PlanConfig
from dpplan.planner.plan import ChangeKind, FitChange, PlanDocument, PlanRecommendation
from dpplan.reports.units import format_bytes


def _gpus(rec: PlanRecommendation) -> str:
    where = f"{rec.gpus} GPU{'s' * (rec.gpus != 1)}"
    details = [f"{rec.nodes} nodes"] if rec.nodes > 1 else []
    if rec.layout != f"dp{rec.gpus}" and rec.layout != "dp1":
        details.append(rec.layout)  # tensor parallelism: the mesh matters
    return where + (f" ({', '.join(details)})" if details else "")


def _offload(offload: str) -> str:
    return "no offload" if offload == "none" else f"offload {offload}"


def change_text(change: FitChange) -> str:
    """One thing to try, with its reason: ``--activation-checkpointing (activations are 30.00 GiB of the peak)``."""
    nbytes = format_bytes(change.nbytes)
    reason = {
        ChangeKind.SMALLER_BATCH: f"{change.strategy} on {change.gpus} GPUs fits it; a larger --grad-accum keeps "
                                  "the samples per step",
        ChangeKind.CHECKPOINTING: f"activations are {nbytes} of the peak",
        ChangeKind.MORE_GPUS: f"{change.strategy} shards its {nbytes} of parameters, gradients and optimizer state "
                              "per GPU over them",
        ChangeKind.SHARDING: f"{change.strategy} keeps {nbytes} of parameters, gradients and optimizer state on "
                             "every GPU",
        ChangeKind.OFFLOAD_OPTIMIZER: f"optimizer state is {nbytes} of the peak",
        ChangeKind.OFFLOAD_PARAMS: f"DeepSpeed's offload_param, ZeRO-3 only: parameters are {nbytes} of the peak",
    }[change.kind]
    return f"{change.flags} ({reason})"


def recommendation_line(rec: PlanRecommendation) -> str:
    """``recommended: fsdp2 on 8 GPUs, micro-batch 4 (up to 12 fits), no offload (peak ... usable)``,
    or, when nothing fits, the closest estimate and what to change."""
    usable = f"{format_bytes(rec.usable_bytes)} usable"
    if rec.fits:
        largest = f" (up to {rec.max_batch_size} fits)" if rec.max_batch_size > rec.batch_size else ""
        return (f"recommended: {rec.strategy} on {_gpus(rec)}, micro-batch {rec.batch_size}{largest}, "
                f"{_offload(rec.offload)} (peak {format_bytes(rec.peak_bytes)} of {usable})")
    line = (f"recommended: nothing fits at micro-batch {rec.batch_size}; closest: {rec.strategy} on {_gpus(rec)}, "
            f"{_offload(rec.offload)}, peak {format_bytes(rec.peak_bytes)} of {usable}")
    return line + (f"; try {'; '.join(change_text(c) for c in rec.changes)}" if rec.changes else "")


def headroom_text(config: PlanConfig) -> str:
    """``fits: peak <= 90% of the memory (10% headroom)``."""
    return f"fits: peak <= {100 - config.headroom_pct:g}% of the memory ({config.headroom_pct:g}% headroom)"


def nodes_text(config: PlanConfig) -> str:
    """How the GPUs are spread over nodes: given, swept by a node size, or one CPU machine."""
    if config.nodes is not None:
        return f"{config.nodes} node{'s' * (config.nodes != 1)}"
    node_size = config.node_size()
    if node_size is None:
        return "1 node"
    if config.gpus_per_node is None:
        return f"{node_size} GPUs per node ({config.gpu}'s usual node)"
    return f"{node_size} GPUs per node"


def render_recommendation(document: PlanDocument, console: Console) -> None:
    """The terminal output's last line: what to run (nothing for a plan without one)."""
    rec = document.plan.recommendation
    if rec is not None:
        console.print(escape(recommendation_line(rec)), style="bold" if rec.fits else "bold yellow",
                      highlight=False)
