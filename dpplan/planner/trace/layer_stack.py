"""The stack of alike layers a deep model is built from: the ``nn.ModuleList`` whose children
are the units, found when they are alike and share no tensor, and short copies of the model
with only its first layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

from torch import nn

from dpplan.training.units import find_units

OUTER = -1
"""Layer index of what lies outside the stack (embedding, head, loss, ...)."""


@dataclass(frozen=True, kw_only=True)
class LayerStack:
    """The ``nn.ModuleList`` whose children are the units, and how names in it read."""

    layers: nn.ModuleList
    prefix: str
    """Qualified name of the list plus a dot ("" when the list is the model itself)."""

    def layer_of(self, name: str) -> int:
        """The layer index a module or parameter name lies in (OUTER if none)."""
        if not name.startswith(self.prefix):
            return OUTER
        head = name[len(self.prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else OUTER

    def renamed(self, name: str, layer: int) -> str:
        rest = name[len(self.prefix):].split(".", 1)
        return self.prefix + str(layer) + ("." + rest[1] if len(rest) > 1 else "")



def find_layer_stack(model: nn.Module, wrap: str | None) -> LayerStack | None:
    """The list whose children are exactly the units, when they are alike and share nothing."""
    units = find_units(model, wrap)
    if not units:
        return None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(units):
            if all(a is b for a, b in zip(module, units)):
                stack = LayerStack(layers=module, prefix=f"{name}." if name else "")
                break
    else:
        return None
    if list(stack.layers._modules) != [str(i) for i in range(len(units))]:
        return None
    signatures = {_layer_signature(layer) for layer in units}
    if len(signatures) != 1:
        return None
    # No tensor may be shared between layers, or between a layer and the rest of the model.
    owners: dict[int, int] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        layer = stack.layer_of(name)
        if owners.setdefault(id(tensor), layer) != layer or (layer != OUTER and tensor is None):
            return None
    counts: dict[int, int] = {}
    for _, tensor in model.named_parameters(remove_duplicate=False):
        counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    for unit in units:
        if any(counts[id(p)] > 1 for p in unit.parameters()):
            return None
    return stack


def _layer_signature(layer: nn.Module) -> tuple:
    modules = tuple((name, type(m).__qualname__) for name, m in layer.named_modules())
    params = tuple(
        (name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in layer.named_parameters(remove_duplicate=False)
    )
    buffers = tuple(
        (name, None if b is None else (tuple(b.shape), b.dtype)) for name, b in layer.named_buffers(remove_duplicate=False)
    )
    return modules, params, buffers


def short_copy(model: nn.Module, stack: LayerStack, depth: int) -> nn.Module:
    """A deep copy of ``model`` with only the first ``depth`` layers in the stack."""
    children = stack.layers._modules
    stack.layers._modules = dict(list(children.items())[:depth])
    try:
        return copy.deepcopy(model)
    finally:
        stack.layers._modules = children


def list_in(model: nn.Module, stack: LayerStack) -> nn.ModuleList:
    name = stack.prefix[:-1]
    # find_layer_stack found an nn.ModuleList at that name (or the model itself is one)
    return cast(nn.ModuleList, model.get_submodule(name) if name else model)


def module_names_of(model: nn.Module) -> tuple[list[str], list[str]]:
    """Module names and class names, as the trace lists them."""
    names, classes = [], []
    for name, sub in model.named_modules():
        names.append(name or "(root)")
        classes.append(type(sub).__name__)
    return names, classes


def param_names_of(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]
