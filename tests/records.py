"""Typed records with made-up numbers, for tests that hand-build profiler or report inputs:
only the fields a test names matter, the rest are plausible placeholders."""

from __future__ import annotations

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.plan import ModelSummary, Plan, PlanDocument, StageEstimate, StrategyEstimate
from dpplan.profiler.profile_document import DeviceInfo, ProfileDocument
from dpplan.profiler.profile_results import RunSettings

MiB = 1 << 20
GiB = 1 << 30


def strategy_estimate(**fields) -> StrategyEstimate:
    values = dict(
        strategy="ddp", gpus=2, nodes=1, batch_size=1, grad_accum=1, precision="bf16-mixed", optimizer="adamw",
        activation_checkpointing=False, offload="none", device="cuda", gpu="h100-80gb",
        breakdown={"params": 0, "grads": 0, "optimizer": 0, "activations": 0, "other": 0},
        peak_bytes=100 * MiB, peak_allocated_bytes=100 * MiB, peak_reserved_bytes=100 * MiB, peak_rank=0,
        peak_phase="backward", capacity_bytes=80 << 30, fits=True, max_batch_size=1,
    )
    values.update(fields)
    return StrategyEstimate(**values)


def stage_estimate(**fields) -> StageEstimate:
    values = dict(pp_rank=0, stages=[0], owns=["layers 0-1"], num_params=0, in_flight=1, peak_bytes=100 * MiB,
                  breakdown={"params": 0, "grads": 0, "optimizer": 0, "activations": 0, "other": 0},
                  peak_phase="backward", fits=True, max_batch_size=1)
    values.update(fields)
    return StageEstimate(**values)


PIPELINE_RANKS = (
    # owns, (params, grads, optimizer, activations, other) GiB, micro-batches in flight (1f1b, pp 4)
    (["embedding", "layers 0-1"], (2, 2, 4, 4, 0.5), 4),
    (["layers 2-3"], (1.5, 1.5, 3, 3, 0.5), 3),
    (["layers 4-5"], (1.5, 1.5, 3, 2.25, 0.5), 2),
    (["layers 6-7", "head"], (2, 2, 4, 1, 0.5), 1),
)
"""A pipeline of four ranks whose lightest is not the last: the head makes rank 3 heavier than 2."""


def pipeline_estimate(strategy: str, gpus: int, *, extra_other_bytes: int = 0) -> StrategyEstimate:
    """``strategy`` over ``gpus`` / 4 pipelines of PIPELINE_RANKS (1f1b, 8 micro-batches), each
    rank ``extra_other_bytes`` more (DDP's buckets); the estimate's peak is rank 0's."""
    stages = []
    for rank, (owns, gib, in_flight) in enumerate(PIPELINE_RANKS):
        breakdown = dict(zip(("params", "grads", "optimizer", "activations", "other"), (int(g * GiB) for g in gib)))
        breakdown["other"] += extra_other_bytes
        stages.append(stage_estimate(pp_rank=rank, stages=[rank], owns=owns, num_params=(rank + 1) * 10**6,
                                     in_flight=in_flight, breakdown=breakdown, peak_bytes=sum(breakdown.values())))
    return strategy_estimate(strategy=strategy, gpus=gpus, dp=gpus // 4, pp=4, pp_schedule="1f1b", grad_accum=8,
                             stages=stages, breakdown=stages[0].breakdown, peak_bytes=stages[0].peak_bytes,
                             peak_allocated_bytes=stages[0].peak_bytes, peak_reserved_bytes=stages[0].peak_bytes)


def pipeline_plan_document() -> PlanDocument:
    """A plan with --pp 4 --grad-accum 8: single on 4 GPUs (one pipeline) and ddp on 8 (two)."""
    config = PlanConfig(run=RunSpec(pp=4, grad_accum=8), strategies=("single", "ddp"), gpus=(4, 8))
    estimates = [pipeline_estimate("single", 4), pipeline_estimate("ddp", 8, extra_other_bytes=GiB // 2)]
    plan = Plan(config=config, model=model_summary(), estimates=estimates)
    return PlanDocument(plan=plan, dpplan_version="test", created=None, command=None)


def model_summary(**fields) -> ModelSummary:
    values = dict(name="m.py", path="m.py", num_params=0, num_trainable_params=0, num_units=0, unit_names=[],
                  checkpointing="none", top_activation_modules=[], trace_seconds=0.0, num_traced_ops=0)
    values.update(fields)
    return ModelSummary(**values)


def run_settings(**fields) -> RunSettings:
    values = dict(strategy="ddp", gpus=2, nodes=1, batch_size=1, grad_accum=1, precision="bf16-mixed",
                  optimizer="adamw", activation_checkpointing=False, offload="none", device="cuda")
    values.update(fields)
    return RunSettings(**values)


def profile_document(**fields) -> ProfileDocument:
    values = dict(
        dpplan_version="test", created=None, command=None, model=model_summary(),
        config={"batch_size": 4, "grad_accum": 1, "precision": "bf16-mixed", "optimizer": "adamw",
                "warmup_steps": 1, "steps": 5},
        device=DeviceInfo(type="cuda", gpus=2, gpu="h100-80gb", description="2 x H100"), notices=(), out_dir="runs/x",
    )
    values.update(fields)
    return ProfileDocument(**values)
