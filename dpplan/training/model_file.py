"""Load a user's model file: the contract every dpplan command shares.

A model file defines
    build_model() -> nn.Module            (or another factory named in ``file.py:factory``)
    example_batch(batch_size) -> dict | tuple | Tensor   (the inputs of one micro-batch;
                                          ``example_batch(batch_size, seq_len=None)`` also takes
                                          ``--seq-len``)
    loss_fn(output, batch) -> Tensor      (optional)
    tp_plan(model, sequence_parallel) -> dict[str, ParallelStyle]
                                          (optional: the plan torch's parallelize_module takes
                                          for --tp; training/tensor_parallel.py otherwise)
    pipeline_stage(model, stage_index, num_stages) -> nn.Module
    pipeline_loss(logits, labels) -> Tensor
                                          (optional: how --pp cuts the model into stages;
                                          training/pipeline_parallel.py)

Without ``loss_fn`` the loss is ``output.loss`` when the output has one (Hugging Face),
else ``output.float().mean()``. The planner calls ``build_model`` and ``example_batch``
under ``torch.device("meta")``, so files must not force a device.

A MODEL that is not a ``.py`` file names a model instead (a Hugging Face config.json, a model
directory, a Hub id, ``timm:NAME``, ``torchvision:NAME``): training/model_by_name.py makes the
same ModelSpec for it.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpplan.errors import UsageError

DEFAULT_FACTORY = "build_model"
MAX_MESSAGE_CHARS = 160
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "default_gpt.py"


class ModelFileError(UsageError):
    """A problem with the user's model file, reported as one line (exit code 2)."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The callables of a loaded model file (or of a model by name)."""

    path: Path
    """Absolute path of the model file (of the config.json for a Hugging Face model by name;
    ``timm:NAME`` / ``torchvision:NAME`` as given)."""
    factory_name: str
    build_model: Callable[[], Any]
    example_batch: Callable[..., Any]
    """``example_batch(batch_size)``, or ``(batch_size, seq_len=None)``."""
    loss_fn: Callable[[Any, Any], Any] | None
    tp_plan: Callable[[Any, bool], Any] | None = None
    pipeline_stage: Callable[[Any, int, int], Any] | None = None
    pipeline_loss: Callable[[Any, Any], Any] | None = None
    display_name: str | None = None
    """The name a model by name is shown as (MODEL as typed); None for model files."""

    @property
    def name(self) -> str:
        """A short display name: ``file.py`` or ``file.py:factory``, or a model's name."""
        if self.display_name:
            return self.display_name
        if self.factory_name == DEFAULT_FACTORY:
            return self.path.name
        return f"{self.path.name}:{self.factory_name}"


def split_model_argument(model: str | None) -> tuple[Path, str]:
    """``path.py[:factory]`` -> (path, factory). ``None`` is the bundled default model."""
    if not model:
        return BUNDLED_MODEL, DEFAULT_FACTORY
    path, sep, factory = model.rpartition(":")
    # A colon may also be part of a Windows drive; only split when the tail is an identifier.
    if not sep or not factory.isidentifier():
        path, factory = model, DEFAULT_FACTORY
    return Path(path), factory


def describe_user_exception(exc: BaseException, path: Path) -> str:
    """'file.py:LINE: ExcType: message' pointing at the deepest frame inside the user's file."""
    location = path.name
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path:
            location = f"{path.name}:{frame.lineno}"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3].rstrip() + "..."
    text = f"{location}: {type(exc).__name__}"
    return f"{text}: {message}" if message else text


def load_model_file(model: str | None) -> ModelSpec:
    """Import the model file and check the contract. Raises ModelFileError with one line.
    A MODEL that is not a ``.py`` file is a model by name (training/model_by_name.py)."""
    from dpplan.training import model_by_name  # imports this module: loaded on first use

    if model and model_by_name.is_model_name(model):
        return model_by_name.load_model_by_name(model)
    path, factory_name = split_model_argument(model)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"model file must be a .py file: {path}")
    path = path.resolve()

    module_name = f"dpplan_user_model_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"cannot import model file: {path}")
    module = importlib.util.module_from_spec(spec)
    # Let the file import its siblings, as `python model.py` would.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ModelFileError(
            f"{path.name}:{exc.lineno}: SyntaxError: {exc.msg}"
        ) from None
    except Exception as exc:  # the user's file raised while importing
        raise ModelFileError(f"error importing {describe_user_exception(exc, path)}") from None
    finally:
        if sys.path and sys.path[0] == str(path.parent):
            sys.path.pop(0)

    build_model = getattr(module, factory_name, None)
    if not callable(build_model):
        raise ModelFileError(
            f"{path.name} defines no function {factory_name}() "
            f"(expected `def {factory_name}(): return model`)"
        )
    example_batch = getattr(module, "example_batch", None)
    if not callable(example_batch):
        raise ModelFileError(
            f"{path.name} defines no function example_batch(batch_size) returning the inputs of one micro-batch"
        )
    loss_fn = getattr(module, "loss_fn", None)
    if loss_fn is not None and not callable(loss_fn):
        raise ModelFileError(f"{path.name}: loss_fn must be a function loss_fn(output, batch)")
    tp_plan = getattr(module, "tp_plan", None)
    if tp_plan is not None and not callable(tp_plan):
        raise ModelFileError(f"{path.name}: tp_plan must be a function tp_plan(model, sequence_parallel)")
    hooks = {}
    for name, signature in (("pipeline_stage", "(model, stage_index, num_stages)"), ("pipeline_loss", "(logits, labels)")):
        hooks[name] = getattr(module, name, None)
        if hooks[name] is not None and not callable(hooks[name]):
            raise ModelFileError(f"{path.name}: {name} must be a function {name}{signature}")
    return ModelSpec(
        path=path,
        factory_name=factory_name,
        build_model=build_model,
        example_batch=example_batch,
        loss_fn=loss_fn,
        tp_plan=tp_plan,
        **hooks,
    )


def call_user(spec: ModelSpec, what: str, fn: Callable, *args: Any) -> Any:
    """Call a function of the user's file; an exception becomes one ModelFileError line."""
    try:
        return fn(*args)
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{what} failed: {describe_user_exception(exc, spec.path)}{device_hint(exc)}") from None


FORCED_DEVICE_MESSAGES = ("not compiled with CUDA", "Cannot copy out of meta tensor", "no NVIDIA driver",
                          "Found no NVIDIA driver", "CUDA driver initialization failed")
"""What torch says when a model file moves a tensor to a GPU itself (``.cuda()``,
``device="cuda"``): no CUDA in this build, or a meta tensor asked for its data."""


def device_hint(exc: BaseException) -> str:
    """A pointer to the contract when ``exc`` comes from a model file that forces a device."""
    if any(message in str(exc) for message in FORCED_DEVICE_MESSAGES):
        return (" (a model file must not force a device: dpplan builds and runs it on a fake device; drop "
                ".cuda() and device=\"cuda\", create tensors with device=x.device; README, \"The model-file contract\")")
    return ""


def example_batch_for(spec: ModelSpec, batch_size: int, seq_len: int | None = None) -> Any:
    """The model file's example batch of ``batch_size`` samples, of ``seq_len`` tokens when
    given (``--seq-len``; the file's ``example_batch`` must then take ``seq_len``)."""
    if seq_len is None:
        return call_user(spec, "example_batch()", spec.example_batch, batch_size)
    parameters: Mapping[str, inspect.Parameter]
    try:
        parameters = inspect.signature(spec.example_batch).parameters
    except (TypeError, ValueError):  # a builtin or a C function: no signature to read
        parameters = {}
    takes = "seq_len" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not takes:
        raise ModelFileError(
            f"--seq-len {seq_len}: {spec.path.name}'s example_batch(batch_size) takes no seq_len; "
            "define example_batch(batch_size, seq_len=None)"
        )
    return call_user(spec, "example_batch()", lambda: spec.example_batch(batch_size, seq_len=seq_len))


def build_module(spec: ModelSpec) -> Any:
    """Run the factory and check it returned an nn.Module."""
    import torch

    model = call_user(spec, f"{spec.factory_name}()", spec.build_model)
    if not isinstance(model, torch.nn.Module):
        raise ModelFileError(
            f"{spec.path.name}: {spec.factory_name}() returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
