"""Which modules form the FSDP units (and the activation-checkpointing units).

Default, as torchtitan wraps a transformer: each child of the model's largest
``nn.ModuleList`` (by parameter count) is a unit, and the root holds the rest.
``--wrap CLASSNAME`` picks every module of that class instead (outermost ones only).
"""

from __future__ import annotations

import torch
from torch import nn

from dpplan.errors import UsageError


class WrapError(UsageError):
    pass


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_units(model: nn.Module, wrap_class: str | None = None) -> list[nn.Module]:
    """The unit modules, in registration order. May be empty (then the root is the only unit)."""
    if wrap_class:
        units: list[nn.Module] = []
        covered: set[int] = set()
        for module in model.modules():
            if id(module) in covered:
                continue
            if type(module).__name__ == wrap_class and module is not model:
                units.append(module)
                covered.update(id(m) for m in module.modules())
        if not units:
            names = sorted({type(m).__name__ for m in model.modules() if m is not model})
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise WrapError(f"--wrap {wrap_class}: the model has no module of that class (it has: {shown})")
        return units
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    largest = max(lists, key=num_params)
    if num_params(largest) == 0:
        return []
    return list(largest)


def unit_names(model: nn.Module, units: list[nn.Module]) -> list[str]:
    names = {id(m): name for name, m in model.named_modules()}
    return [names.get(id(u), type(u).__name__) for u in units]


def checkpoint_units(model: nn.Module, units: list[nn.Module], observe=None) -> str:
    """Activation checkpointing as dpplan plans it.

    The model's own ``gradient_checkpointing_enable()`` where it has one (Hugging Face),
    non-reentrant; else each unit's forward runs under non-reentrant
    ``torch.utils.checkpoint.checkpoint`` (what torch's ``checkpoint_wrapper`` does).
    Returns which of the two was used. ``observe(unit_index, forward)``, when given, wraps the
    forward that checkpointing runs (the first time and again when recomputing in backward),
    so the tracer can mark the recomputation.
    """
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if callable(enable):
        try:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        except TypeError:
            enable()
        return "model"
    targets = units or [model]
    for index, unit in enumerate(targets):
        forward = unit.forward if observe is None else observe(index, unit.forward)
        unit.forward = _checkpointed(forward)
    return "units"


def _checkpointed(forward):
    def checkpointed_forward(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward
