"""What the tracer changes in torch while a model is built or traced: weight initialisers
skipped on the meta device, a GradScaler that always steps, the host generator's state as a
traced tensor; and the autograd engine's graph-task id, read to tell backward from forward."""

from __future__ import annotations

import contextlib

import torch

from dpplan.planner.fake_device.fake_tensor import META, FakeDeviceTensor


def always_stepping(grad_scaler):
    """A GradScaler that steps the optimizer without reading ``found_inf``.

    On the fake device ``found_inf`` has no value; a real fp16 run steps on all but the rare
    overflowing iterations, and those are what the plan is about. ``_maybe_opt_step`` is the
    private hook of ``torch.amp.GradScaler`` that makes that decision.
    """

    def step_unconditionally(optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)

    grad_scaler._maybe_opt_step = step_unconditionally
    return grad_scaler


@contextlib.contextmanager
def skip_weight_init():
    """Turn ``torch.nn.init``'s in-place initialisers into no-ops while a meta model is built.

    On the meta device they compute nothing but still cost about a second for a 70B model.
    """
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {name: getattr(init, name) for name in names}

    def keep(tensor, *args, **kwargs):
        return tensor

    for name in names:
        setattr(init, name, keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


@contextlib.contextmanager
def host_rng_state_as_traced_tensor():
    """Make ``torch.get_rng_state()`` return a traced tensor of the real state's size.

    Checkpointing (``preserve_rng_state=True``) keeps the CPU generator's state per
    checkpointed region from forward until its backward, and ``torch.random.fork_rng`` takes
    one more copy while a region is recomputed (torch/utils/checkpoint.py). The real call
    creates its tensor outside the dispatcher, so the tracer would not see it; on a CPU
    target those bytes are part of the measured peak. ``torch.set_rng_state`` with such a
    tensor does nothing (there is no data to restore)."""
    real_get, real_set = torch.get_rng_state, torch.set_rng_state
    state_bytes = real_get().numel()

    def traced_get_rng_state():
        return torch.empty(state_bytes, dtype=torch.uint8, device=META)

    def traced_set_rng_state(state):
        if state.device.type == "meta" or isinstance(state, FakeDeviceTensor):
            return None
        return real_set(state)

    torch.get_rng_state, torch.set_rng_state = traced_get_rng_state, traced_set_rng_state
    try:
        yield
    finally:
        torch.get_rng_state, torch.set_rng_state = real_get, real_set


def current_graph_task_id() -> int:
    """-1 outside backward; used to tell a recomputed forward (checkpointing) from a real one."""
    return torch._C._current_graph_task_id()
