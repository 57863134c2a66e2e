"""The private torch APIs the tracer relies on, checked before a trace: a changed one is our error.

The tracer runs a model on fake-device tensors (planner/fake_device/), which
needs parts of torch that are not public and may change in any release. Each is checked here
with a small call that exercises it the way the tracer does; when one fails, planning stops
with ``TorchApiChanged``, an internal error (exit 1) that names the API and the torch versions
dpplan's tracer is tested with, instead of blaming the user's model for a torch change.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from dpplan.errors import InternalError

TESTED_TORCH = ("2.13", "2.14")
"""The torch releases CI tests: .ci/run runs the whole suite on torch==2.13.0 (the CPU build) and
the planner and CLI tests on torch==2.14.1; pyproject.toml asks for torch>=2.13."""
CPU_BUILD = "2.13.0"
"""The release whose CPU build the README installs."""


class TorchApiChanged(InternalError):
    """A private torch API the tracer relies on behaves differently in the installed torch."""


def _fake_tensor_reports_cpu() -> None:
    from dpplan.planner.fake_device.fake_tensor import FakeDeviceTensor

    meta = torch.empty(3, 4, device="meta")
    fake = FakeDeviceTensor(meta)
    assert fake.device == torch.device("cpu"), f"reports {fake.device}"
    assert fake.untyped_storage()._cdata == meta.untyped_storage()._cdata, "no longer shares its storage"


def _storage_lifetime() -> None:
    meta = torch.empty(4, device="meta")
    died: list[bool] = []
    ref = weakref.ref(meta.untyped_storage(), lambda _: died.append(True))
    assert ref() is not None and not died, "a storage's Python object dies before its tensors"
    del meta
    assert died, "a storage's death no longer reaches weak references"


def _dispatch_mode() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        torch.empty(2, device="meta") + 1
    with _disable_current_modes():
        pass
    assert torch.ops.aten.add.Tensor in seen, "aten ops no longer reach a TorchDispatchMode"


def _conv_backend_selection() -> None:
    x, w = torch.empty(1, 2, 4, 4), torch.empty(2, 2, 3, 3)
    backend = torch._C._select_conv_backend(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, None)
    torch._C._conv_determine_backend_memory_format(x, w, backend)


def _graph_task_id() -> None:
    assert torch._C._current_graph_task_id() == -1


def _grad_scaler_hooks() -> None:
    scaler = torch.amp.GradScaler("cpu")
    for name in ("_maybe_opt_step", "_unscale_grads_"):
        assert callable(getattr(scaler, name, None)), f"GradScaler.{name} is gone"


def _allocation_events() -> None:
    from torch.autograd import profiler as autograd_profiler

    from dpplan.planner.cpu_kernels import quiet_stderr

    recorder = autograd_profiler.profile(use_cpu=True, profile_memory=True, use_kineto=True)
    with quiet_stderr(), recorder:
        torch.empty(16)
    results = recorder.kineto_results
    assert results is not None, "the profiler kept no results"
    nodes = list(results.experimental_event_tree())
    fields = [n.extra_fields for n in nodes]
    assert any(type(f).__name__.endswith("Allocation") and hasattr(f, "ptr") for f in fields), (
        "the profiler's event tree no longer carries allocations with their address"
    )


CHECKS: dict[str, Callable[[], None]] = {
    "Tensor._make_subclass(dispatch_device=True, device_for_backend_keys=...) and UntypedStorage._cdata":
        _fake_tensor_reports_cpu,
    "weak references to UntypedStorage (storage lifetime)": _storage_lifetime,
    "torch.utils._python_dispatch.TorchDispatchMode / _disable_current_modes": _dispatch_mode,
    "torch._C._select_conv_backend / _conv_determine_backend_memory_format": _conv_backend_selection,
    "torch._C._current_graph_task_id": _graph_task_id,
    "torch.amp.GradScaler._maybe_opt_step / _unscale_grads_": _grad_scaler_hooks,
    "the profiler's allocation events (kineto_results.experimental_event_tree)": _allocation_events,
}
"""Each private API (by name) and the check that exercises it."""

CPU_TARGET_ONLY = frozenset({_allocation_events})
"""Checks of APIs only the CPU target uses (planner/cpu_kernels.py measures kernels with it)."""

_passed: set[Callable[[], None]] = set()


def check(device_type: str = "cpu") -> None:
    """Raise TorchApiChanged for the first private API that fails its check (each checked once
    per process)."""
    for name, exercise in CHECKS.items():
        if exercise in _passed or (exercise in CPU_TARGET_ONLY and device_type != "cpu"):
            continue
        try:
            exercise()
        except Exception as exc:  # whatever the change broke: an assertion, a missing name, a new signature
            raise TorchApiChanged(changed_api_message(name, exc)) from None
        _passed.add(exercise)


def changed_api_message(api: str, exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"torch {torch.__version__} changed a private API dpplan's tracer relies on: {api} "
        f"({type(exc).__name__}: {detail}); the tracer is tested with torch {', '.join(TESTED_TORCH)}: "
        f"install one of those (torch=={CPU_BUILD} is a CPU build) or a dpplan release for torch {torch.__version__}"
    )
