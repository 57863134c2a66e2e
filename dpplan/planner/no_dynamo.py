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
that (and ``trace_rules.clear_lru_cache()``, which ``init_process_group`` calls, and the
``config`` submodule, a leaf module imported as itself); any other name, and any import of another
submodule, imports the real ``torch._dynamo`` in its place, so a torch (or a model) that asks
for more costs time, never correctness. On exit the stand-in is removed, and so is every
``disable`` result the wrappers cached on their function, so a later ``torch.compile`` in the
same process sees torch as it was.

Private API used: the module name ``torch._dynamo`` and the attribute ``__dynamo_disable`` under
which the wrappers cache what they call. tests/planner/test_trace_speed.py checks that a trace
leaves ``torch._dynamo`` unimported and the caches clean.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

_NAME = "torch._dynamo"
_CONFIG = _NAME + ".config"
_CACHE_ATTRIBUTE = "__dynamo_disable"


class _StandIn(ModuleType):
    """``torch._dynamo`` for code that runs outside ``torch.compile``."""

    def __init__(self):
        super().__init__(_NAME)
        self.passed_through: list[Callable] = []
        self.__path__: list[str] = []  # a package: its submodules are found by _SubmoduleHandOver
        # init_process_group clears dynamo's trace-rule caches when torch._dynamo is imported
        # (torch/distributed/distributed_c10d.py): a dynamo that never ran has none to clear
        # (the fake process group of a tensor-parallel trace would otherwise import it: 0.8 s)
        self.trace_rules = SimpleNamespace(clear_lru_cache=lambda: None)

    def disable(self, fn=None, recursive=True, **kwargs):
        if fn is None:  # used as @disable(...)
            return lambda f: self.disable(f, recursive, **kwargs)
        self.passed_through.append(fn)
        return fn

    def graph_break(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            # Module metadata (``__file__``, ``__loader__``, ...), which tools such as
            # ``inspect.getmodule`` probe on every module, possibly in the middle of an import
            # that the real torch._dynamo would need: a plain module without it.
            raise AttributeError(name)
        # Anything else: the real module, from now on for every importer too.
        return getattr(self.hand_over(), name)

    def hand_over(self) -> ModuleType:
        """Import the real torch._dynamo in place of the stand-in; return it."""
        if sys.modules.get(_NAME) is self:
            del sys.modules[_NAME]
            if vars(torch).get("_dynamo") is self:
                delattr(torch, "_dynamo")
        return importlib.import_module(_NAME)


class _SubmoduleHandOver(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import torch._dynamo.x`` (flex attention does) while the stand-in is in place: the
    import system would look for ``x`` in the stand-in. Found here instead: the real package
    is imported in the stand-in's place, then its submodule, whose module object the import
    in progress then receives as it is (nothing runs twice)."""

    def __init__(self, stand_in: _StandIn):
        self.stand_in = stand_in

    def find_spec(self, fullname, path, target=None):
        if sys.modules.get(_NAME) is not self.stand_in or not fullname.startswith(_NAME + "."):
            return None
        if fullname == _CONFIG:
            # dynamo's settings alone, a leaf module (torch's FakeTensorMode reads two of them
            # at each construction, which DTensor's sharding propagation does): imported as
            # itself; the real package, if it comes later, finds it in sys.modules
            return importlib.util.spec_from_file_location(fullname, Path(torch.__file__).parent / "_dynamo" / "config.py")
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        self.stand_in.hand_over()
        return importlib.import_module(spec.name)

    def exec_module(self, module) -> None:
        return None  # imported by create_module


@contextlib.contextmanager
def dynamo_untouched() -> Iterator[None]:
    """Run the block with the stand-in as ``torch._dynamo`` (see module docstring)."""
    if _NAME in sys.modules:  # already imported: nothing to save
        yield
        return
    stand_in = _StandIn()
    finder = _SubmoduleHandOver(stand_in)
    sys.modules[_NAME] = stand_in
    torch._dynamo = stand_in
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        if sys.modules.get(_NAME) is stand_in:
            del sys.modules[_NAME]
        if vars(torch).get("_dynamo") is stand_in:
            delattr(torch, "_dynamo")
        for fn in stand_in.passed_through:
            if getattr(fn, _CACHE_ATTRIBUTE, None) is fn:
                delattr(fn, _CACHE_ATTRIBUTE)
