"""Keep ``torch._dynamo`` unimported while a step is traced.

Importing ``torch._dynamo`` takes about as long as importing torch itself (~1.5 s), and the
traced step would import it only to tell a compiler that is not running to stay away:
  - ``torch._disable_dynamo`` wrappers (torch/_compile.py; the optimizer's
    ``add_param_group`` and ``zero_grad``, its step functions, checkpointing, the Python meta
    kernels of torch/_refs) import it on their first call to build
    ``torch._dynamo.disable(fn)``, which they then call instead of ``fn``;
  - every optimizer ``step`` (torch/optim/optimizer.py ``_use_grad_for_differentiable``)
    imports it to call ``torch._dynamo.graph_break()``.
Outside ``torch.compile`` both are pass-throughs: ``disable(fn)`` runs ``fn``, ``graph_break()``
does nothing. Inside ``dynamo_untouched`` a stand-in module answers those two names with exactly
that; any other name imports the real ``torch._dynamo`` and is answered by it, so a torch that
asks for more costs time, never correctness. On exit the stand-in is removed, and so is every
``disable`` result the wrappers cached on their function, so a later ``torch.compile`` in the
same process sees torch as it was.

Private API used: the module name ``torch._dynamo`` and the attribute ``__dynamo_disable`` under
which the wrappers cache what they call. tests/planner/test_fake_device.py checks that a trace
leaves ``torch._dynamo`` unimported and the caches clean.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from types import ModuleType
from typing import Any, Callable, Iterator

import torch

_NAME = "torch._dynamo"
_CACHE_ATTRIBUTE = "__dynamo_disable"


class _StandIn(ModuleType):
    """``torch._dynamo`` for code that runs outside ``torch.compile``."""

    def __init__(self):
        super().__init__(_NAME)
        self.passed_through: list[Callable] = []

    def disable(self, fn=None, recursive=True, **kwargs):
        if fn is None:  # used as @disable(...)
            return lambda f: self.disable(f, recursive, **kwargs)
        self.passed_through.append(fn)
        return fn

    def graph_break(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            # Module metadata (``__file__``, ``__path__``, ...), which tools such as
            # ``inspect.getmodule`` probe on every module, possibly in the middle of an import
            # that the real torch._dynamo would need: a plain module without it.
            raise AttributeError(name)
        # Anything else: the real module, from now on for every importer too.
        if sys.modules.get(_NAME) is self:
            del sys.modules[_NAME]
            if getattr(torch, "_dynamo", None) is self:
                delattr(torch, "_dynamo")
        return getattr(importlib.import_module(_NAME), name)


@contextlib.contextmanager
def dynamo_untouched() -> Iterator[None]:
    """Run the block with the stand-in as ``torch._dynamo`` (see module docstring)."""
    if _NAME in sys.modules:  # already imported: nothing to save
        yield
        return
    stand_in = _StandIn()
    sys.modules[_NAME] = stand_in
    torch._dynamo = stand_in
    try:
        yield
    finally:
        if sys.modules.get(_NAME) is stand_in:
            del sys.modules[_NAME]
        if getattr(torch, "_dynamo", None) is stand_in:
            delattr(torch, "_dynamo")
        for fn in stand_in.passed_through:
            if getattr(fn, _CACHE_ATTRIBUTE, None) is fn:
                delattr(fn, _CACHE_ATTRIBUTE)
