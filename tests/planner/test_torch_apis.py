"""A torch release that changes a private API the tracer relies on is dpplan's error (exit 1),
named, never "the model rejected its example batch"."""

import pytest
import torch
from click.testing import CliRunner

from dpplan.cli import main
from dpplan.planner import torch_apis
from dpplan.planner.trace import TracerBug, TraceSettings, trace_step
from dpplan.training.model_file import load_model_file
from tests.conftest import FIXTURES


def test_every_private_api_works_on_this_torch():
    torch_apis._passed.clear()
    torch_apis.check("cpu")
    assert len(torch_apis._passed) == len(torch_apis.CHECKS)


def test_a_changed_private_api_is_named_with_the_tested_torch(monkeypatch):
    torch_apis._passed.clear()

    def gone():
        raise AttributeError("module 'torch._C' has no attribute '_current_graph_task_id'")

    monkeypatch.setattr(torch._C, "_current_graph_task_id", gone)
    with pytest.raises(torch_apis.TorchApiChanged, match=r"_current_graph_task_id.*tested with torch 2\.13"):
        torch_apis.check("cuda")
    result = CliRunner().invoke(main, ["estimate", str(FIXTURES / "tiny_mlp.py"), "--gpus", "1"])
    assert result.exit_code == 1, result.output
    assert "internal error" in result.output and "changed a private API" in result.output
    assert "rejected" not in result.output
    torch_apis._passed.clear()


def test_a_failure_in_the_tracers_own_code_is_internal_not_the_models(monkeypatch):
    monkeypatch.delattr(torch._C, "_select_conv_backend")  # as if a torch release renamed it
    monkeypatch.setattr(torch_apis, "_passed", set(torch_apis.CHECKS.values()))  # past the up-front check
    with pytest.raises(TracerBug, match=r"meta_kernels.py:\d+.*AttributeError.*tested with torch"):
        trace_step(load_model_file(str(FIXTURES / "tiny_cnn.py")), TraceSettings(), batch_size=2)
    result = CliRunner().invoke(main, ["estimate", str(FIXTURES / "tiny_cnn.py"), "--gpus", "1"])
    assert result.exit_code == 1 and "internal error" in result.output, result.output
