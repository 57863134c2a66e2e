"""The tracer's shortcuts change how fast a step is traced, never what the trace says."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dpplan.planner.fake_device import op_cache
from dpplan.planner.trace import PARAM_CAST, TraceSettings, trace_step
from dpplan.training.model_file import load_model_file

ROOT = Path(__file__).resolve().parents[2]


def assert_same_trace(a, b):
    """Event for event, storage for storage, marker for marker."""
    for field in dataclasses.fields(a):
        left, right = getattr(a, field.name), getattr(b, field.name)
        if isinstance(left, np.ndarray):
            assert np.array_equal(left, right), field.name
        else:
            assert left == right, field.name


def run_python(code: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_tracing_leaves_dynamo_unimported(tiny_gpt):
    """Optimizer construction and step, the grad scaler, the Python meta kernels and ZeRO's
    optimizer-state probe all run without importing torch._dynamo, and afterwards torch's
    ``_disable_dynamo`` wrappers hold no cache of ours."""
    run_python(f"""
        import sys
        import torch
        from dpplan.training.model_file import load_model_file
        from dpplan.planner.strategies.zero_common import flat_state_bytes
        from dpplan.planner.trace import PARAM_CAST, TraceSettings, trace_step

        spec = load_model_file({tiny_gpt!r})
        for settings in (
            TraceSettings(precision="fp32", device_type="cuda"),
            TraceSettings(precision="fp16-mixed", family=PARAM_CAST, cast_buffers=True, device_type="cuda"),
            TraceSettings(precision="bf16-mixed", optimizer="sgd-momentum", num_micro_batches=2, grad_accum=2),
        ):
            trace_step(spec, settings)
        flat_state_bytes("adamw", 1000)
        assert "torch._dynamo" not in sys.modules, "a trace imported torch._dynamo"
        assert "_dynamo" not in vars(torch), "the stand-in was left on torch"
        wrapped = torch.optim.Optimizer.add_param_group.__wrapped__
        assert "__dynamo_disable" not in vars(wrapped), "a disable cache was left behind"
    """)


def test_dynamo_stand_in_hands_over_to_the_real_module():
    """A name the stand-in does not know imports the real torch._dynamo, which stays."""
    run_python("""
        import sys
        import torch
        from dpplan.planner.no_dynamo import dynamo_untouched

        with dynamo_untouched():
            assert torch._dynamo.graph_break() is None
            config = torch._dynamo.config
        import torch._dynamo
        assert sys.modules["torch._dynamo"].config is config
        assert type(sys.modules["torch._dynamo"]).__name__ == "module"
    """)


def test_dynamo_submodule_import_hands_over_once():
    """``from torch._dynamo.x import y`` under the stand-in gets the real submodule, and no
    module of torch._dynamo is executed twice (its config stays one object)."""
    run_python("""
        import sys
        import torch
        from dpplan.planner.no_dynamo import dynamo_untouched

        with dynamo_untouched():
            from torch._dynamo.utils import clone_input
            config = sys.modules["torch._dynamo.config"]
        import torch._dynamo
        import torch._dynamo.utils
        assert torch._dynamo.utils.clone_input is clone_input
        assert torch._dynamo.config is config is sys.modules["torch._dynamo.config"]
    """)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_foreach_ops_deduplicated_trace_the_same(tiny_gpt, monkeypatch, precision):
    """The foreach optimizer step (a CUDA target) traced with one kernel call per distinct
    element equals the trace with every element run, and the shortcut was taken for in-place
    ops (only checked) and for out-of-place ones (whose outputs are copied)."""
    family = PARAM_CAST if precision != "fp32" else "autocast"
    settings = TraceSettings(precision=precision, family=family, device_type="cuda")
    spec = load_model_file(tiny_gpt)
    taken = []
    real = op_cache.run_foreach_deduplicated

    def spy(func, *args):
        result = real(func, *args)
        if result is not op_cache.NOT_DEDUPLICATED:
            taken.append(func._schema.name)
        return result

    monkeypatch.setattr(op_cache, "OP_CACHE", {})
    monkeypatch.setattr(op_cache, "run_foreach_deduplicated", spy)
    fast = trace_step(spec, settings)
    assert "aten::_foreach_sqrt" in taken and "aten::_foreach_addcdiv_" in taken, taken

    monkeypatch.setattr(op_cache, "OP_CACHE", {})
    monkeypatch.setattr(op_cache, "run_foreach_deduplicated", lambda *a: op_cache.NOT_DEDUPLICATED)
    full = trace_step(spec, settings)
    assert_same_trace(fast, full)
