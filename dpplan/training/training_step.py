"""The training step dpplan plans, shared by the tracer (planner) and real runs (profiler).

One optimizer step per rank: for each of ``grad_accum`` micro-batches,
``loss = loss_fn(model(**batch), batch) / grad_accum``, the output released before
``loss.backward()`` (as Hugging Face's Trainer does), gradient sync skipped on all but the
last micro-batch; then ``optimizer.step()`` and ``optimizer.zero_grad(set_to_none=True)``.
Because estimate and measurement run this same code, they mean the same thing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

LOW_PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16, "bf16": torch.bfloat16}


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """A dict is passed as keyword arguments, a tuple or list positionally, a tensor alone."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def default_loss(output: Any) -> torch.Tensor:
    """``output.loss`` when present (Hugging Face), else ``output.float().mean()``."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        output = output["logits"]
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the model returned {type(output).__name__}: define loss_fn(output, batch) in the model file"
        )
    return output.float().mean()


def compute_loss(model: torch.nn.Module, batch: Any, loss_fn: Callable | None) -> torch.Tensor:
    output = call_model(model, batch)
    loss = loss_fn(output, batch) if loss_fn is not None else default_loss(output)
    del output
    return loss


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating tensors in ``dtype`` (integer ids and other leaves as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((k, cast_floating(v, dtype)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(cast_floating(v, dtype) for v in value)
    return value


def autocast_context(precision: str, device_type: str, uses_autocast: bool):
    """``torch.autocast`` for the mixed precisions of strategies that compute under autocast."""
    if uses_autocast and precision in ("bf16-mixed", "fp16-mixed"):
        return torch.autocast(device_type=device_type, dtype=LOW_PRECISION_DTYPE[precision])
    return contextlib.nullcontext()


def run_micro_batch(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Callable | None,
    *,
    grad_accum: int,
    autocast: contextlib.AbstractContextManager,
    grad_scaler: Any | None,
    before_backward: Callable[[], None] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Forward, loss, release the output, backward: one micro-batch. ``backward(loss)`` replaces
    ``loss.backward()`` where an engine owns it (DeepSpeed's ``engine.backward``)."""
    with autocast:
        loss = compute_loss(model, batch, loss_fn)
    if grad_accum > 1:
        loss = loss / grad_accum
    if grad_scaler is not None:
        loss = grad_scaler.scale(loss)
    if before_backward is not None:
        before_backward()
    if backward is not None:
        backward(loss)
    else:
        loss.backward()


def run_optimizer_step(optimizer: torch.optim.Optimizer, grad_scaler: Any | None) -> None:
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_fn: Callable | None,
    *,
    grad_accum: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    no_sync: Callable[[], contextlib.AbstractContextManager] | None,
    grad_scaler: Any | None = None,
    on_phase: Callable[[str], contextlib.AbstractContextManager] | None = None,
    before_backward: Callable[[], None] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """One optimizer step. ``no_sync`` (DDP/FSDP) wraps all micro-batches but the last.

    ``on_phase(name)`` returns a context that marks a phase ("micro_batch", "optimizer");
    the tracer and the CPU memory recorder use it to label what they see.
    ``before_backward()`` is called in each micro-batch between the loss and its backward,
    so a profiler can tell the forward's peak from the backward's.
    """
    phase = on_phase or (lambda name: contextlib.nullcontext())
    for index in range(grad_accum):
        last = index == grad_accum - 1
        sync_context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with phase("micro_batch"), sync_context:
            run_micro_batch(
                model, batch, loss_fn, grad_accum=grad_accum, autocast=autocast(), grad_scaler=grad_scaler,
                before_backward=before_backward, backward=backward,
            )
    with phase("optimizer"):
        run_optimizer_step(optimizer, grad_scaler)
