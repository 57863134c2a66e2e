"""The command line, in-process with click's CliRunner: every flag and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dpplan.cli import main
from dpplan.planner.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--strategy", "single,ddp", "--gpus", "1,2"]


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_bundled_model_without_arguments():
    result = run("estimate", *FAST)
    assert result.exit_code == 0, result.output
    assert "default_gpt.py" in result.output
    assert "ddp" in result.output and "single" in result.output


def test_json_to_stdout_is_the_only_output(tiny_gpt):
    result = run("estimate", tiny_gpt, *FAST, "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["schema_version"] == 1
    assert data["model"]["num_params"] > 0
    estimate = data["estimates"][0]
    for key in ("strategy", "gpus", "nodes", "batch_size", "grad_accum", "precision", "optimizer",
                "activation_checkpointing", "offload", "device", "breakdown", "peak_bytes", "fits",
                "max_batch_size", "host_bytes"):
        assert key in estimate
    assert set(estimate["breakdown"]) == {"params", "grads", "optimizer", "activations", "other"}
    assert [(e["strategy"], e["gpus"]) for e in data["estimates"]] == [("single", 1), ("ddp", 1), ("ddp", 2)]


def test_json_to_a_file_and_a_table(tiny_gpt, tmp_path):
    out = tmp_path / "plan.json"
    result = run("estimate", tiny_gpt, *FAST, "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "peak GiB" in result.output
    assert json.loads(out.read_text())["config"]["strategies"] == ["single", "ddp"]


def estimate_json(*args):
    result = run("estimate", *args, "--json", "-")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_every_flag_reaches_the_plan(tiny_gpt):
    """Every flag at a value other than its default, so that each assertion shows the flag arrived
    (fsdp2: a strategy with offload; LayerNorm units instead of the default, tiny_gpt's Blocks).
    --device cpu reaching the plan is checked in test_flags_change_the_numbers (it drops --gpu)."""
    data = estimate_json(
        tiny_gpt, "--strategy", "fsdp2", "--gpus", "4,8", "--nodes", "2", "--batch-size", "3",
        "--grad-accum", "2", "--precision", "fp32", "--optimizer", "sgd-momentum",
        "--activation-checkpointing", "--offload", "optimizer", "--wrap", "LayerNorm", "--gpu", "a100-40gb",
    )
    assert [(e["strategy"], e["gpus"]) for e in data["estimates"]] == [("fsdp2", 4), ("fsdp2", 8)]
    e = data["estimates"][0]
    assert (e["nodes"], e["batch_size"], e["grad_accum"]) == (2, 3, 2)
    settings = (e["precision"], e["optimizer"], e["activation_checkpointing"], e["gpu"])
    assert settings == ("fp32", "sgd-momentum", True, "a100-40gb")
    assert e["capacity_bytes"] == 40960 * 2**20
    assert e["offload"] == "optimizer" and e["host_bytes"] > 0  # None without offload
    assert data["model"]["unit_names"] == ["blocks.0.ln_1", "blocks.0.ln_2", "blocks.1.ln_1", "blocks.1.ln_2", "ln_f"]
    assert data["model"]["num_units"] == 5 and data["model"]["checkpointing"] == "units"


def test_flags_change_the_numbers(tiny_gpt):
    base = estimate_json(tiny_gpt, "--strategy", "single", "--gpus", "1")["estimates"][0]
    bigger = estimate_json(tiny_gpt, "--strategy", "single", "--gpus", "1", "--batch-size", "8")["estimates"][0]
    assert bigger["breakdown"]["activations"] > base["breakdown"]["activations"]
    sgd = estimate_json(tiny_gpt, "--strategy", "single", "--gpus", "1", "--optimizer", "sgd")["estimates"][0]
    assert sgd["breakdown"]["optimizer"] < base["breakdown"]["optimizer"]
    cpu = estimate_json(tiny_gpt, "--strategy", "single", "--gpus", "1", "--device", "cpu")["estimates"][0]
    assert cpu["gpu"] is None and cpu["peak_bytes"] == cpu["peak_allocated_bytes"] == cpu["peak_reserved_bytes"]
    assert base["peak_bytes"] > base["peak_reserved_bytes"] >= base["peak_allocated_bytes"]


def test_gpus_command_lists_the_catalog():
    result = run("gpus")
    assert result.exit_code == 0
    assert len(result.output.splitlines()) >= 10 and "h100-80gb" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "fsdp3"], "unknown strategy 'fsdp3'"),
        (["--gpus", "0"], "positive integers"),
        (["--gpus", "two"], "positive integers"),
        (["--gpus", "3", "--nodes", "2"], "does not split evenly"),
        (["--precision", "fp8"], "'fp8' is not one of"),
        (["--optimizer", "lion"], "'lion' is not one of"),
        (["--offload", "disk"], "'disk' is not one of"),
        (["--gpu", "h800"], "unknown GPU 'h800'"),
        (["--batch-size", "0"], "0 is not in the range"),
        (["--device", "tpu"], "'tpu' is not one of"),
        (["--cpu-isa", "avx2"], "--cpu-isa applies to --device cpu only"),
        (["--device", "cpu", "--cpu-isa", "sse4"], "'sse4' is not one of"),
        (["--sp"], "sequence parallelism (--sp) needs tensor parallelism"),
        (["--tp", "2", "--strategy", "zero2"], "--tp combines with single, fsdp2"),
        (["--tp", "2", "--gpus", "3"], "--tp 2 does not divide gpus=3"),
        (["--tp", "0"], "0 is not in the range"),
        (["--seq-len", "0"], "0 is not in the range"),
        (["--headroom", "100"], "100.0 is not in the range"),
        (["--headroom", "-1"], "is not in the range"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(tiny_gpt, args, message):
    result = run("estimate", tiny_gpt, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_unknown_wrap_class(tiny_gpt):
    line = one_line_error(run("estimate", tiny_gpt, *FAST, "--wrap", "Decoder"))
    assert "--wrap Decoder" in line and "Block" in line


def test_missing_model_file():
    assert "model file not found" in one_line_error(run("estimate", "no_such_model.py"))


def test_model_file_with_a_syntax_error(write_model):
    path = write_model("def build_model(:\n")
    assert "model.py:1: SyntaxError" in one_line_error(run("estimate", path))


def test_model_file_that_raises(write_model):
    path = write_model("import torch\nx = 1\nraise ValueError('bad config')\n")
    assert "model.py:3: ValueError: bad config" in one_line_error(run("estimate", path))


def test_no_factory(write_model):
    path = write_model("def example_batch(b): return None\n")
    assert "no function build_model()" in one_line_error(run("estimate", path))


def test_factory_returns_no_module(write_model):
    path = write_model("def build_model(): return 'model'\ndef example_batch(b): return None\n")
    assert "returned str, not a torch.nn.Module" in one_line_error(run("estimate", path, *FAST))


def test_input_the_model_rejects(write_model):
    path = write_model(
        "import torch\ndef build_model(): return torch.nn.Linear(4, 4)\ndef example_batch(b): return torch.zeros(b, 3)\n"
    )
    assert "the model rejected its example batch" in one_line_error(run("estimate", path, *FAST))


def test_example_batch_that_raises(write_model):
    path = write_model(
        "import torch\ndef build_model(): return torch.nn.Linear(4, 4)\ndef example_batch(b):\n    raise KeyError('tokens')\n"
    )
    assert "example_batch() failed: model.py:4: KeyError" in one_line_error(run("estimate", path, *FAST))


def test_a_shape_error_names_the_users_batch(write_model):
    """The planner traces at micro-batch 1009; a model that rejects it is retraced at the user's
    micro-batch, so the error is in the user's numbers (2 x 3 x 8 = 48 elements)."""
    path = write_model("""
        import torch, torch.nn as nn
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 8)
            def forward(self, x):
                return self.fc(x.view(4, -1, 8))
        def build_model(): return M()
        def example_batch(b): return torch.randn(b, 3, 8)
    """)
    result = run("estimate", path, "--strategy", "single", "--gpus", "1", "--batch-size", "2")
    assert result.exit_code == 2, result.output
    assert "is invalid for input of size 48" in result.output and "1009" not in result.output


def test_a_model_file_that_forces_a_device_is_pointed_to_the_contract(write_model):
    path = write_model("""
        import torch, torch.nn as nn
        def build_model(): return nn.Linear(4, 4).cuda()
        def example_batch(b): return torch.randn(b, 4)
    """)
    result = run("estimate", path, "--strategy", "single", "--gpus", "1")
    assert result.exit_code == 2, result.output
    assert "a model file must not force a device" in result.output


def test_help_has_examples():
    result = run("--help")
    assert result.exit_code == 0 and "Examples:" in result.output and "dpplan estimate model.py" in result.output


def test_json_into_a_missing_directory(tiny_gpt, tmp_path):
    result = run("estimate", tiny_gpt, *FAST, "--json", str(tmp_path / "no" / "plan.json"))
    assert result.exit_code == 2 and "directory does not exist" in result.output


def test_tensor_parallel_defaults_and_layout():
    """--tp without --strategy and --gpus: the strategies that run over it, on multiples of it;
    every estimate carries its layout, the table names it."""
    data = estimate_json("--tp", "2", "--sp")
    cells = [(e["strategy"], e["gpus"], e["dp"], e["tp"], e["sp"]) for e in data["estimates"]]
    assert cells == [("single", 2, 1, 2, True), ("fsdp2", 2, 1, 2, True), ("fsdp2", 4, 2, 2, True),
                     ("fsdp2", 8, 4, 2, True), ("fsdp2", 16, 8, 2, True)]
    assert (data["config"]["tp"], data["config"]["sequence_parallel"]) == (2, True)
    table = run("estimate", "--tp", "2", "--gpus", "4", "--strategy", "fsdp2")
    assert table.exit_code == 0 and "dp2 x tp2" in table.output and "tensor parallel 2" in table.output


def test_expert_parallel_defaults_and_a_model_without_experts(tiny_gpt):
    """--ep without --strategy and --gpus plans fsdp2 on multiples of it; a model with no
    experts module is one line, exit 2."""
    moe = str(Path(__file__).parents[1] / "benchmarks" / "models" / "moe_balanced_router.py") + ":mixtral"
    pytest.importorskip("transformers")
    data = estimate_json(moe, "--ep", "2", "--gpus", "2,4")
    assert [(e["strategy"], e["gpus"], e["dp"], e["ep"]) for e in data["estimates"]] == [("fsdp2", 2, 2, 2), ("fsdp2", 4, 4, 2)]
    assert data["config"]["ep"] == 2
    table = run("estimate", moe, "--ep", "2", "--gpus", "4")
    assert table.exit_code == 0 and "dp4 ep2" in table.output and "expert parallel 2" in table.output
    result = run("estimate", tiny_gpt, "--ep", "2", "--gpus", "2")
    assert result.exit_code == 2 and "no experts module dpplan can split" in result.output


def test_seq_len_reaches_the_example_batch():
    """--seq-len is handed to example_batch(batch_size, seq_len=...); the plan states the
    sequence and its tokens, and half the sequence fits larger micro-batches."""
    full = estimate_json("--strategy", "single", "--gpus", "1", "--batch-size", "2")
    half = estimate_json("--strategy", "single", "--gpus", "1", "--batch-size", "2", "--seq-len", "128")
    assert (full["model"]["seq_len"], full["model"]["tokens_per_micro_batch"]) == (256, 512)
    assert (half["model"]["seq_len"], half["model"]["tokens_per_micro_batch"]) == (128, 256)
    assert half["config"]["seq_len"] == 128 and full["config"]["seq_len"] is None
    assert half["estimates"][0]["max_batch_size"] > full["estimates"][0]["max_batch_size"]
    table = run("estimate", "--strategy", "single", "--gpus", "1", "--seq-len", "128")
    assert "sequence 128, 128 tokens" in table.output


def test_seq_len_needs_a_model_file_that_takes_it(tiny_mlp):
    result = run("estimate", tiny_mlp, "--seq-len", "64")
    assert result.exit_code == 2, result.output
    assert "takes no seq_len; define example_batch(batch_size, seq_len=None)" in result.output


def test_gpus_per_node_sweeps_nodes(tiny_gpt):
    data = estimate_json(tiny_gpt, "--strategy", "ddp", "--gpus", "4,16,32", "--gpus-per-node", "8")
    assert [(e["gpus"], e["nodes"]) for e in data["estimates"]] == [(4, 1), (16, 2), (32, 4)]


def test_sixteen_gpus_are_two_nodes_where_hybrid_sharding_differs_from_full(tiny_gpt):
    """The GPU's usual node (8 H100s): fsdp-hybrid shards inside each node and replicates across
    the two, so it keeps twice fsdp-full's parameter shard; on one node (4 GPUs, or --nodes 1)
    the two are the same plan."""
    flags = (tiny_gpt, "--strategy", "fsdp-full,fsdp-hybrid", "--gpus", "4,16")
    plans = {(e["strategy"], e["gpus"]): e for e in estimate_json(*flags)["estimates"]}
    assert {(gpus, e["nodes"]) for (_, gpus), e in plans.items()} == {(4, 1), (16, 2)}
    full, hybrid = plans["fsdp-full", 16], plans["fsdp-hybrid", 16]
    assert hybrid["breakdown"]["params"] > full["breakdown"]["params"] and hybrid["peak_bytes"] > full["peak_bytes"]
    assert plans["fsdp-full", 4]["peak_bytes"] == plans["fsdp-hybrid", 4]["peak_bytes"]
    one_node = {e["strategy"]: e for e in estimate_json(*flags, "--nodes", "1")["estimates"] if e["gpus"] == 16}
    assert one_node["fsdp-full"]["nodes"] == one_node["fsdp-hybrid"]["nodes"] == 1
    assert one_node["fsdp-full"]["peak_bytes"] == one_node["fsdp-hybrid"]["peak_bytes"]
    assert one_node["fsdp-full"]["breakdown"]["params"] == full["breakdown"]["params"]


def test_a_cpu_target_is_one_node_whatever_the_count(tiny_gpt):
    data = estimate_json(tiny_gpt, "--strategy", "ddp", "--gpus", "16", "--device", "cpu")
    assert [e["nodes"] for e in data["estimates"]] == [1]
    assert (data["config"]["nodes"], data["config"]["gpus_per_node"]) == (None, None)


def test_a_gpu_count_off_the_node_size_is_one_line(tiny_gpt):
    line = one_line_error(run("estimate", tiny_gpt, "--gpus", "12"))
    assert "gpus=12 does not fill whole nodes of 8 GPUs" in line and "--gpus-per-node or --nodes" in line
    assert [e["nodes"] for e in estimate_json(tiny_gpt, "--strategy", "ddp", "--gpus", "12", "--gpus-per-node", "4")
            ["estimates"]] == [3]


def test_headroom_decides_fits_and_the_largest_micro_batch(tiny_gpt):
    flags = (tiny_gpt, "--strategy", "ddp", "--gpus", "2")
    none, half = (estimate_json(*flags, "--headroom", pct) for pct in ("0", "50"))
    assert (none["config"]["headroom_pct"], half["config"]["headroom_pct"]) == (0.0, 50.0)
    assert half["estimates"][0]["headroom_pct"] == 50.0
    assert half["estimates"][0]["peak_bytes"] == none["estimates"][0]["peak_bytes"]
    assert half["estimates"][0]["max_batch_size"] < none["estimates"][0]["max_batch_size"]
    assert half["recommendation"]["usable_bytes"] == none["recommendation"]["usable_bytes"] // 2
    assert estimate_json(*flags)["config"]["headroom_pct"] == 10.0


def test_nodes_and_gpus_per_node_together(tiny_gpt):
    result = run("estimate", tiny_gpt, "--nodes", "1", "--gpus-per-node", "8", "--gpus", "8")
    assert result.exit_code == 2 and "not both" in result.output


def test_offload_shows_host_memory_per_node(tiny_gpt):
    data = estimate_json(tiny_gpt, "--strategy", "ddp,zero2", "--gpus", "4", "--offload", "optimizer")
    by_strategy = {e["strategy"]: e for e in data["estimates"]}
    assert by_strategy["ddp"]["host_bytes"] is None
    assert by_strategy["zero2"]["host_bytes"] > 0
    table = run("estimate", tiny_gpt, "--strategy", "ddp,zero2", "--gpus", "4", "--offload", "optimizer").output
    assert "host GiB/node" in table and "ddp has no offload" in table


@pytest.mark.parametrize("size", ["24", "24 parsecs", "-1GiB", "0GB", "GiB"])
def test_gpu_memory_needs_a_size_with_a_unit(tiny_gpt, size):
    result = run("profile", tiny_gpt, "--device", "cpu", "--gpu-memory", size)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "Error" in line or "error" in line]
    assert len(errors) == 1 and "'--gpu-memory'" in errors[0], result.output
    assert "24GiB" in errors[0] or "above zero" in errors[0]
    assert "Traceback" not in result.output


def test_find_batch_size_on_cpu_needs_a_capacity(tiny_gpt, tmp_path):
    line = one_line_error(run("profile", tiny_gpt, "--device", "cpu", "--find-batch-size", "--out", str(tmp_path)))
    assert "--find-batch-size on CPU ranks needs --gpu-memory" in line
    assert not (tmp_path / "profile.json").exists()  # refused before any launch


def test_the_program_flushes_everything_before_its_quick_exit(tiny_gpt, tmp_path):
    """``dpplan estimate`` ends without Python's teardown of torch (dpplan.cli.run): its table,
    JSON on a pipe and JSON file are complete, and errors still exit 2 with their line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "plan.json"
    done = subprocess.run(
        [sys.executable, "-P", "-m", "dpplan.cli", "estimate", tiny_gpt, "--gpus", "1,2", "--json", "-"],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["estimates"]) == 1 + 2 * (len(STRATEGIES) - 1)
    done = subprocess.run(
        [sys.executable, "-P", "-m", "dpplan.cli", "estimate", tiny_gpt, "--gpus", "2", "--json", str(out)],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "fsdp2" in done.stdout and len(json.loads(out.read_text())["estimates"]) == len(STRATEGIES) - 1
    done = subprocess.run(
        [sys.executable, "-P", "-m", "dpplan.cli", "estimate", str(tmp_path / "missing.py")],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "missing.py" in done.stderr


def _estimate_tiny_cnn_on_cpu(*args):
    """`dpplan estimate` of the tiny CNN on 2 CPU ranks in a fresh process, no ISA cap inherited."""
    from tests.conftest import FIXTURES

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        env.pop(name, None)
    command = [sys.executable, "-P", "-m", "dpplan.cli", "estimate", str(FIXTURES / "tiny_cnn.py"), "--device", "cpu",
               "--gpus", "2", "--strategy", "fsdp2", "--batch-size", "2", "--json", "-"]
    return subprocess.run(command + list(args), env=env, capture_output=True, text=True)


def test_cpu_isa_plans_the_kernels_of_a_lower_instruction_set():
    """--cpu-isa caps oneDNN and ATen before torch starts (a fresh process): the kernels, and the
    in-op buffers measured from them, are those of that CPU; the plan says which."""
    done = _estimate_tiny_cnn_on_cpu("--cpu-isa", "avx2")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert "kernels for avx2 (ATen AVX2" in plan["cpu_kernels"] and plan["config"]["cpu_isa"] == "avx2"


def test_cpu_isa_above_this_cpu_is_refused():
    import torch

    if torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has AMX: no instruction set above it to refuse")
    done = _estimate_tiny_cnn_on_cpu("--cpu-isa", "amx")
    assert done.returncode == 2 and "this CPU has no amx" in done.stderr


def test_deepspeed_config_file_is_planned(tiny_gpt, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}, "bf16": {"enabled": True}}))
    result = run("estimate", tiny_gpt, "--deepspeed-config", str(config), "--gpus", "2", "--json", "-")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert [e["strategy"] for e in plan["estimates"]] == ["zero3"]
    assert plan["config"]["zero"]["reduce_bucket_size"] == 1000
    assert plan["estimates"][0]["precision"] == "bf16-mixed"
    assert any("ds.json" in note for note in plan["estimates"][0]["notes"])


def test_deepspeed_config_errors_are_one_line(tiny_gpt, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    line = one_line_error(run("estimate", tiny_gpt, "--deepspeed-config", str(config)))
    assert "hidden_size" in line
    line = one_line_error(run("estimate", tiny_gpt, "--deepspeed-config", str(tmp_path / "none.json")))
    assert "no such file" in line
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    line = one_line_error(run("estimate", tiny_gpt, "--deepspeed-config", str(config), "--precision", "fp32"))
    assert "--precision fp32 contradicts" in line


HF_MODEL_WITH_A_WARNING = '''
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def build_model():
    warnings.warn("the model file's own warning", UserWarning)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32))


def example_batch(batch_size, seq_len=16):
    ids = torch.randint(0, 128, (batch_size, seq_len))
    return {"input_ids": ids, "labels": ids}
'''


def test_third_party_warnings_do_not_reach_the_terminal(write_model):
    """A Hugging Face model with checkpointing: transformers' FutureWarning (its
    gradient_checkpointing_enable is deprecated) and its logger's notices are not shown; the
    model file's own warning is, and so is dpplan's output."""
    pytest.importorskip("transformers")
    model = write_model(HF_MODEL_WITH_A_WARNING)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}
    done = subprocess.run(
        [sys.executable, "-P", "-m", "dpplan.cli", "estimate", model, "--gpus", "2", "--strategy", "ddp",
         "--activation-checkpointing"],
        env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "ddp" in done.stdout and "checkpointing (model's own)" in done.stdout
    assert "UserWarning: the model file's own warning" in done.stderr
    assert "FutureWarning" not in done.stderr and "[transformers]" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 2, done.stderr  # the warning and its source line
