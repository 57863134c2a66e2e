"""The optimizers dpplan plans for, built the way torch builds them on the target device.

torch picks the step implementation from the parameters' device
(``torch/optim/optimizer.py::_default_to_fused_or_foreach``): ``foreach`` on CUDA, the
per-parameter loop on CPU. The foreach step keeps about one parameter-sized temporary more
("uses ~ sizeof(params) more peak memory than the for-loop version", torch.optim docs), so
the device matters to the estimate. The tracer runs on a CPU-reporting fake device and
therefore asks for ``foreach=True`` explicitly when the target is a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dpplan.errors import UsageError

if TYPE_CHECKING:  # torch is imported where an optimizer is built: the CLI starts without it
    import torch

OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "adafactor")
LEARNING_RATE = 1e-4


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, device_type: str) -> torch.optim.Optimizer:
    """The optimizer ``name`` with torch's defaults for ``device_type`` ("cpu" or "cuda")."""
    import torch

    params = list(params)
    extra: dict[str, Any] = {"foreach": True} if device_type == "cuda" else {}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LEARNING_RATE, **extra)
    if name == "adam":
        return torch.optim.Adam(params, lr=LEARNING_RATE, **extra)
    if name == "sgd":
        return torch.optim.SGD(params, lr=LEARNING_RATE, **extra)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=LEARNING_RATE, momentum=0.9, **extra)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=LEARNING_RATE, **extra)
    raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def optimizer_class_and_kwargs(name: str, *, device_type: str) -> tuple[type, dict]:
    """Class and keyword arguments, for wrappers that build the optimizer themselves
    (``ZeroRedundancyOptimizer``)."""
    import torch

    extra: dict[str, Any] = {"foreach": True} if device_type == "cuda" else {}
    table = {
        "adamw": (torch.optim.AdamW, {}),
        "adam": (torch.optim.Adam, {}),
        "sgd": (torch.optim.SGD, {}),
        "sgd-momentum": (torch.optim.SGD, {"momentum": 0.9}),
        "adafactor": (torch.optim.Adafactor, {}),
    }
    if name not in table:
        raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    cls, kwargs = table[name]
    return cls, {"lr": LEARNING_RATE, **kwargs, **extra}
