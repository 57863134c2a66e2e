"""Typed records with made-up numbers, for tests that hand-build profiler or report inputs:
only the fields a test names matter, the rest are plausible placeholders."""

from __future__ import annotations

from dpplan.planner.plan import ModelSummary, StrategyEstimate
from dpplan.profiler.profile_document import DeviceInfo, ProfileDocument
from dpplan.profiler.profile_results import RunSettings

MiB = 1 << 20


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
