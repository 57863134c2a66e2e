"""Values the trace knows: small tensors computed from constants, carried beside the meta tensors.

A meta tensor has a shape and no data. Most of a training step needs no more, but models read
some values to decide what they allocate: Hugging Face's masking code asks whether the position
ids are a single sequence per row (``(packed_mask[:, -1] == 0).all()``, computed from an
``arange``) and builds a 4-D mask only if not; an optimizer reads its step count; wav2vec2 indexes
its hidden states with a time mask drawn in numpy. Those values come from constants: factories
whose result is fixed (``arange``, ``zeros``, ``full``, a tensor made from Python or numpy data)
and ops on them. The tracer keeps a real CPU copy of each such tensor of at most
``MAX_ELEMENTS`` elements and runs the op on the copies too, so ``.item()``, ``nonzero`` or
boolean indexing of them give the real answer and the shapes that follow from it.

Nothing derived from the model's inputs or parameters has a value (they are meta tensors, and
random factories are not constants): data-dependent ops on those are planned at an upper bound
(planner/data_dependent.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

MAX_ELEMENTS = 1 << 23
"""Largest tensor whose value is kept (8 Mi elements: position ids of 1009 x 8192 tokens)."""

_UNKNOWN = object()
_NO_VALUE_FACTORIES = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted")
"""Factories whose memory is uninitialised: their contents are no constant."""


def value_of(value: Any, is_stale: Callable[[torch.Tensor], bool]) -> Any:
    """The real CPU tensor behind ``value`` (a real CPU tensor is its own value), or _UNKNOWN."""
    known = getattr(value, "known_value", None)
    if known is not None:
        return _UNKNOWN if is_stale(value) else known
    if value.device.type == "cpu" and not hasattr(value, "meta"):
        return value
    return _UNKNOWN


def _values(value: Any, is_stale) -> Any:
    if isinstance(value, torch.Tensor):
        return value_of(value, is_stale)
    if isinstance(value, (list, tuple)):
        out = [_values(v, is_stale) for v in value]
        return _UNKNOWN if any(v is _UNKNOWN for v in out) else type(value)(out)
    if isinstance(value, torch.device) and value.type != "cpu":
        return torch.device("cpu")
    return value


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    return False


def is_constant_op(func) -> bool:
    """Whether ``func`` gives the same values on every run (no random numbers, no uninitialised
    memory)."""
    if torch.Tag.nondeterministic_seeded in func.tags:
        return False
    name = func._schema.name.split("::")[-1]
    if name in _NO_VALUE_FACTORIES:
        return False
    return True


def run_on_values(func, args: tuple, kwargs: dict, is_stale) -> Any:
    """The op run for real on the known values of all its inputs; _UNKNOWN when some input has
    none, the op is not constant, or an output is too large to keep."""
    if not is_constant_op(func):
        return _UNKNOWN
    has_inputs = _has_tensor(args) or _has_tensor(list(kwargs.values()))
    real_args = _values(args, is_stale)
    if real_args is _UNKNOWN:
        return _UNKNOWN
    real_kwargs = {k: _values(v, is_stale) for k, v in kwargs.items()}
    if any(v is _UNKNOWN for v in real_kwargs.values()):
        return _UNKNOWN
    if not has_inputs and "device" in kwargs:
        real_kwargs["device"] = torch.device("cpu")
    try:
        result = func(*real_args, **real_kwargs)
    except Exception:  # the values were not enough (an op that wants another device, say)
        return _UNKNOWN
    return result if _small(result) else _UNKNOWN


def small_enough(result: Any) -> bool:
    """Whether every tensor of ``result`` (meta or real) is small enough to keep a value of."""
    return _small(result)


def _small(result: Any) -> bool:
    if isinstance(result, torch.Tensor):
        return result.numel() <= MAX_ELEMENTS
    if isinstance(result, (list, tuple)):
        return all(_small(r) for r in result)
    return True


def attach(wrapped: Any, values: Any) -> None:
    """Give each traced output tensor its value (same structure as the op's result)."""
    if values is _UNKNOWN or values is None:
        return
    if isinstance(wrapped, torch.Tensor) and isinstance(values, torch.Tensor):
        if tuple(wrapped.shape) == tuple(values.shape) and wrapped.dtype == values.dtype:
            wrapped.known_value = values  # type: ignore[attr-defined]  # read back with getattr (known())
    elif isinstance(wrapped, (list, tuple)) and isinstance(values, (list, tuple)):
        for w, v in zip(wrapped, values):
            attach(w, v)


def is_unknown(value: Any) -> bool:
    return value is _UNKNOWN
