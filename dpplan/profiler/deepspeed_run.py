"""zero1, zero2, zero3 for real: a DeepSpeed engine built exactly as the planner models it.

The engine is made by ``deepspeed.initialize`` from a torch optimizer (the client optimizer, as
Hugging Face's Trainer hands one over) and a config whose ZeRO settings are the ones the plan
uses (DeepSpeed's defaults, or a user's file: planner/strategies/zero_settings.py), written out
so that a change of DeepSpeed's defaults cannot change what is measured.

Precision, as users mean it (Lightning's DeepSpeedStrategy and accelerate map so):
  fp32        no precision section
  bf16-mixed  the ``"bf16"`` section: DeepSpeed casts the parameters (not the buffers) to bf16
              and keeps an fp32 master partition; floating inputs are cast to bf16, as the
              Trainer does (transformers/trainer.py ``_prepare_input``)
  fp16-mixed  the ``"fp16"`` section: the same in fp16, with dynamic loss scaling
  bf16        the model is already bf16 (the worker casts it); the ``"bf16"`` section
  with ``ZeroSettings.torch_autocast``: the ``"torch_autocast"`` section instead

The training step (training/training_step.py) drives the engine: forward through the engine,
``engine.backward`` (the loss is already divided by the accumulation steps), and one
``engine.step()`` after the last micro-batch, which steps and zeroes the gradients. The
micro-batches before the last run with the accumulation boundary off
(``set_gradient_accumulation_boundary``), DeepSpeed's own way to step once per accumulation.

On CPU ranks the collectives are gloo's and the engine's accelerator is DeepSpeed's CPU
accelerator. ``offload_optimizer`` / ``offload_param`` run there too (the host copies then share
the process memory with everything else, and the plan counts them so); with a torch optimizer
offload needs ``"zero_force_ds_cpu_optimizer": false`` (else DeepSpeed insists on its compiled
CPU Adam). ``torch_autocast`` (from ``--deepspeed-config``) leaves the parameters and inputs in
fp32; the engine's forward and the step's loss run under autocast.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from dpplan.planner.deepspeed_config import resolve_for_model
from dpplan.planner.strategies.registry import DEEPSPEED_STAGES
from dpplan.planner.strategies.zero_settings import DEFAULT_ZERO, ZeroSettings
from dpplan.training.optimizers import build_optimizer
from dpplan.training.training_step import cast_floating

PRECISION_SECTIONS = {"bf16-mixed": "bf16", "bf16": "bf16", "fp16-mixed": "fp16"}
INPUT_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "fp16-mixed": torch.float16}
INSTALL_HINT = 'DeepSpeed is not installed: pip install --no-build-isolation deepspeed (after torch), or "dpplan[deepspeed]"'


def deepspeed_config(
    strategy: str, *, precision: str, offload: str, batch_size: int, grad_accum: int, world_size: int,
    zero_settings: ZeroSettings = DEFAULT_ZERO,
) -> dict[str, Any]:
    """The DeepSpeed config of a planned run (keys: https://www.deepspeed.ai/docs/config-json/):
    every setting the plan depends on written out, whatever DeepSpeed's defaults become."""
    stage = DEEPSPEED_STAGES[strategy]
    settings = zero_settings
    if settings.hidden_size_auto:
        raise RuntimeError(f"unresolved \"auto\" DeepSpeed settings {settings.hidden_size_auto}")
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": settings.reduce_bucket_size,
        "allgather_bucket_size": settings.allgather_bucket_size,
        "overlap_comm": settings.overlaps_comm(stage),
        "sub_group_size": settings.sub_group_size,
    }
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": settings.prefetch_bucket_size,
            "stage3_max_live_parameters": settings.max_live_parameters,
            "stage3_max_reuse_distance": settings.max_reuse_distance,
            "stage3_param_persistence_threshold": settings.param_persistence_threshold,
        })
    if offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if offload == "optimizer+params" and stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    section = PRECISION_SECTIONS.get(precision)
    if settings.torch_autocast:
        dtype = {"bf16-mixed": "bfloat16", "fp16-mixed": "float16"}[precision]
        config["torch_autocast"] = {"enabled": True, "dtype": dtype}
    elif section == "fp16":
        # Dynamic loss scaling starting at 2^0, not DeepSpeed's 2^16: a short profiling run
        # would otherwise skip its first steps for overflow and never create the optimizer
        # state (measured: 21 MB missing on a 5M-parameter GPT). The scale changes no memory.
        config[section] = {"enabled": True, "initial_scale_power": 0}
    elif section is not None:
        config[section] = {"enabled": True}
    return config


class EngineOptimizer:
    """The optimizer the training step drives: ``step`` is the engine's (which steps the ZeRO
    optimizer and zeroes the gradients), ``zero_grad`` has nothing left to do."""

    def __init__(self, engine):
        self.engine = engine

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def engine_no_sync(engine):
    """The micro-batches before the last: no accumulation boundary (no reduction, no step)."""

    @contextlib.contextmanager
    def no_sync():
        engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            engine.set_gradient_accumulation_boundary(True)

    return no_sync


def initialize_engine(
    model: nn.Module, strategy: str, *, precision: str, optimizer_name: str, device: torch.device,
    offload: str, batch_size: int, grad_accum: int, zero: ZeroSettings = DEFAULT_ZERO,
):
    """``(engine, optimizer)`` for ``model`` (on ``device``), the process group already up."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ValueError(INSTALL_HINT) from exc
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized():
        raise ValueError(f"{strategy} runs through torchrun (a process group), even on one rank")
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    config = deepspeed_config(
        strategy, precision=precision, offload=offload, batch_size=batch_size, grad_accum=grad_accum, world_size=world,
        zero_settings=resolve_for_model(zero, model),
    )
    client = build_optimizer(optimizer_name, model.parameters(), device_type="cpu" if offload != "none" else device.type)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config, dist_init_required=False)
    engine.set_gradient_accumulation_boundary(True)
    return engine, EngineOptimizer(engine)


def cast_inputs(batch: Any, precision: str, torch_autocast: bool = False) -> Any:
    """Floating input tensors in the engine's dtype (integer ids stay as they are); under
    torch_autocast the parameters stay fp32 and so do the inputs."""
    dtype = None if torch_autocast else INPUT_DTYPES.get(precision)
    return batch if dtype is None else cast_floating(batch, dtype)
