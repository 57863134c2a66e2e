"""dpplan/errors.py and the CLI's one place that turns errors into a line and an exit code."""

import pytest

from dpplan import errors
from dpplan.cli import _run_safely
from dpplan.planner.data_dependent import UnboundedOp
from dpplan.planner.fake_device.fake_tensor import FakeDeviceError
from dpplan.planner.torch_apis import TorchApiChanged
from dpplan.planner.trace import TraceError, TracerBug
from dpplan.training.model_file import ModelFileError
from dpplan.training.units import WrapError


@pytest.mark.parametrize("cls", [ModelFileError, TraceError, WrapError, UnboundedOp])
def test_the_users_mistakes_are_usage_errors(cls):
    assert issubclass(cls, errors.UsageError) and cls.exit_code == 2


@pytest.mark.parametrize("cls", [TracerBug, FakeDeviceError, TorchApiChanged])
def test_our_failures_are_internal_errors_and_never_usage_errors(cls):
    assert issubclass(cls, errors.InternalError) and not issubclass(cls, errors.UsageError)
    assert cls.exit_code == 1


def _exit_of(action, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        _run_safely(action)
    return stopped.value.code, capsys.readouterr().err


def _raise(exc):
    def action():
        raise exc
    return action


def test_a_usage_error_is_one_line_and_exit_2(capsys):
    code, err = _exit_of(_raise(errors.UsageError("--gpus 3 does not split into 2 nodes")), capsys)
    assert (code, err) == (2, "error: --gpus 3 does not split into 2 nodes\n")


def test_a_plain_value_error_is_a_bug_of_ours_not_the_users(capsys, monkeypatch):
    monkeypatch.delenv("DPPLAN_DEBUG", raising=False)
    code, err = _exit_of(_raise(ValueError("list.index(x): x not in list")), capsys)
    assert code == 1
    assert err.startswith("error: internal error: ValueError: list.index(x)") and "DPPLAN_DEBUG=1" in err
    assert "Traceback" not in err


def test_an_internal_error_says_so(capsys):
    code, err = _exit_of(_raise(TracerBug("meta_kernels.py:12: AttributeError: x")), capsys)
    assert (code, err) == (1, "error: internal error: meta_kernels.py:12: AttributeError: x\n")


def test_a_failed_run_exits_1_without_blaming_anyone(capsys):
    code, err = _exit_of(_raise(errors.RunFailed("1 of 2 runs failed: ddp: rank 1: oom")), capsys)
    assert (code, err) == (1, "error: 1 of 2 runs failed: ddp: rank 1: oom\n")


def test_interrupted_exits_130_and_carries_what_finished(capsys):
    document = {"kind": "profile", "runs": [{"strategy": "ddp"}], "interrupted": True}
    interrupted = errors.Interrupted("interrupted; 1 finished run(s) kept in x", document=document)
    assert interrupted.document is document
    code, err = _exit_of(_raise(interrupted), capsys)
    assert (code, err) == (130, "error: interrupted; 1 finished run(s) kept in x\n")
    code, err = _exit_of(_raise(KeyboardInterrupt()), capsys)
    assert (code, err) == (130, "error: interrupted\n")


def test_debug_shows_the_traceback_of_a_bug(monkeypatch):
    monkeypatch.setenv("DPPLAN_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        _run_safely(lambda: 1 / 0)
