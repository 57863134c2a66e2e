"""The tracer's two failures: the model's (``TraceError``, one line for the user) and its own
(``TracerBug``, an internal error), told apart by where the failure was raised."""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

from dpplan.errors import InternalError, UsageError
from dpplan.planner import data_dependent, torch_apis
from dpplan.planner.fake_device.fake_tensor import FakeDeviceError
from dpplan.training.model_file import ModelFileError, ModelSpec, describe_user_exception, device_hint


class TraceError(UsageError):
    """The model could not be run on the fake device (one line for the user)."""


class TracerBug(InternalError):
    """The tracer itself failed (a dpplan bug, or a torch change under it): an internal error."""


_PACKAGE = str(Path(__file__).resolve().parent.parent.parent)
"""The dpplan package (planner/trace/ lies two folders below it)."""


def as_trace_failure(exc: Exception, spec: ModelSpec) -> Exception:
    """The error to raise for ``exc``, raised while tracing ``spec``'s model: ``exc`` itself
    when it already says what went wrong, else a TraceError (the model's fault) or a TracerBug
    (ours)."""
    if isinstance(exc, (ModelFileError, TraceError, FakeDeviceError)):
        return exc
    if isinstance(exc, data_dependent.UnboundedOp):
        where = f" in module {exc.where}" if exc.where else ""
        location = describe_user_exception(exc, spec.path).split(": ", 1)[0]
        return TraceError(
            f"cannot plan {exc.op}{where} ({location}): its output size depends on data, which does "
            "not exist while planning, and has no upper bound"
        )
    if _raised_by_dpplan(exc):  # our code or a torch API under it, not the user's model
        return TracerBug(
            f"{_innermost(exc)}: {type(exc).__name__}: {exc} (torch {torch.__version__}; the tracer is "
            f"tested with torch {', '.join(torch_apis.TESTED_TORCH)})"
        )
    return TraceError(_describe_trace_failure(exc, spec))


def _raised_by_dpplan(exc: BaseException) -> bool:
    """Whether the innermost Python frame of the failure is dpplan's: an AttributeError or a
    TypeError of ours, or a private torch API that changed under a call of ours. Failures inside
    torch's kernels (a shape mismatch) and inside the model's code are the model's."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE) and not isinstance(
        exc, (RuntimeError, NotImplementedError)
    )


def _innermost(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} ({frame.line})"


def _describe_trace_failure(exc: BaseException, spec: ModelSpec) -> str:
    text = describe_user_exception(exc, spec.path)
    if "data-dependent" in str(exc) or "nonzero" in str(exc) or "_local_scalar_dense" in str(exc):
        text += " (the model uses an op whose output size depends on data, which cannot be planned without data)"
    return f"the model rejected its example batch: {text}{device_hint(exc)}"

