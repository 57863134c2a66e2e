"""dpplan/config.py: one RunSpec in every config, one set of defaults, one name per field."""

import json
import subprocess
import sys

import pytest

from dpplan.cli import main
from dpplan.config import RUN_FIELDS, PlanConfig, ProfileConfig, RunConfig, RunSpec
from dpplan.planner.strategies.zero_settings import ZeroSettings

FLAG_OF_FIELD = {"batch_size": "batch_size", "grad_accum": "grad_accum", "precision": "precision",
                 "optimizer": "optimizer", "activation_checkpointing": "activation_checkpointing",
                 "offload": "offload", "wrap": "wrap"}


@pytest.mark.parametrize("command", ["estimate", "profile"])
def test_the_run_flags_default_to_the_runspec(command):
    defaults = {p.name: p.default for p in main.commands[command].params}
    spec = RunSpec()
    for field, flag in FLAG_OF_FIELD.items():
        assert defaults[flag] == getattr(spec, field), f"{command} --{flag.replace('_', '-')}"


def test_every_config_nests_the_same_runspec():
    run = RunSpec(model="m.py", batch_size=3, precision="fp32", offload="optimizer")
    plan = PlanConfig(run=run, strategies=("zero2",), gpus=(2,))
    profile = ProfileConfig(run=run, strategies=("zero2",), gpus=2)
    worker = RunConfig(run=run, strategy="zero2")
    assert plan.run is profile.run is worker.run


def test_nodes_has_one_name_in_estimate_and_profile():
    assert {p.name for p in main.commands["estimate"].params} >= {"nodes"}
    assert {p.name for p in main.commands["profile"].params} >= {"nodes"}
    for command in ("estimate", "profile"):
        (option,) = [p for p in main.commands[command].params if p.name == "nodes"]
        assert set(option.opts) == {"--nodes", "--nnodes"}, command


def test_the_json_is_one_flat_object_and_reads_back():
    run = RunSpec(model="m.py", batch_size=3, zero=ZeroSettings(reduce_bucket_size=7, hidden_size_auto=("x",)))
    worker = RunConfig(run=run, strategy="zero2", steps=2, nodes=1)
    data = worker.to_json()
    assert set(RUN_FIELDS) <= set(data) and "run" not in data
    assert RunConfig.from_json(data) == worker
    plan = PlanConfig(run=run, strategies=("zero2",), gpus=(2, 4)).to_json()
    assert plan["batch_size"] == 3 and plan["gpus"] == [2, 4] and "extra" not in plan


@pytest.mark.parametrize(("make", "message"), [
    (lambda: RunSpec(batch_size=0), "batch_size must be >= 1"),
    (lambda: RunSpec(precision="fp8"), "precision must be one of"),
    (lambda: PlanConfig(strategies=("nope",)), "strategy must be one of"),
    (lambda: ProfileConfig(strategies=("ddp",), run=RunSpec(zero=ZeroSettings(reduce_bucket_size=1))), "zero1, zero2 and zero3"),
    (lambda: RunConfig(run=RunSpec(), strategy="ddp", device="tpu"), "device must be one of"),
    (lambda: PlanConfig(run=RunSpec(ep=2), strategies=("ddp",)), "--ep runs beside fsdp2 .* not ddp"),
    (lambda: RunSpec(ep=2, tp=2), "--ep with --tp is not planned yet"),
    (lambda: PlanConfig(run=RunSpec(ep=4), strategies=("fsdp2",), gpus=(2,)), "--ep 4 does not divide the 2 data-parallel"),
    (lambda: ProfileConfig(run=RunSpec(ep=2), strategies=("fsdp2",), gpus=3), "--ep 2 does not divide the 3 data-parallel"),
])
def test_each_field_is_checked_once_with_its_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_cli_its_configs_and_reading_saved_results_start_without_torch():
    modules = "dpplan.config, dpplan.cli, dpplan.planner.plan, dpplan.profiler.profile_document, dpplan.reports.html_report"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_plan_config_reads_back_from_its_flat_json():
    run = RunSpec(model="m.py", batch_size=3, zero=ZeroSettings(reduce_bucket_size=7, hidden_size_auto=("x", "y")))
    plan = PlanConfig(run=run, strategies=("zero2", "zero3"), gpus=(2, 4), gpus_per_node=2, device="cpu", cpu_isa="avx2",
                      capacity_bytes=5)
    data = json.loads(json.dumps(plan.to_json()))  # as a saved plan has it: lists, not tuples
    back = PlanConfig.from_json(data)
    assert back == plan and back.run.zero.hidden_size_auto == ("x", "y")
    assert list(back.to_json()) == list(plan.to_json())
    with pytest.raises(ValueError, match="strategy must be one of"):
        PlanConfig.from_json({**data, "strategies": ["nope"]})


def test_gpu_counts_span_the_gpus_usual_nodes_unless_told():
    """--gpus 16 on H100s is 2 nodes of 8 (hardware.py gpus_per_node); --nodes and --gpus-per-node
    say otherwise; a CPU target is the ranks of one machine."""
    sweep = (1, 4, 8, 16, 32)
    assert [PlanConfig(gpus=sweep).nodes_for(g) for g in sweep] == [1, 1, 1, 2, 4]
    assert [PlanConfig(gpus=sweep, gpu="t4-16gb").nodes_for(g) for g in sweep] == [1, 1, 2, 4, 8]
    assert [PlanConfig(gpus=sweep, gpus_per_node=4).nodes_for(g) for g in sweep] == [1, 1, 2, 4, 8]
    assert [PlanConfig(gpus=(16,), nodes=1).nodes_for(16)] == [1]
    assert [PlanConfig(gpus=sweep, device="cpu").nodes_for(g) for g in sweep] == [1] * 5


def test_a_gpu_count_that_fills_no_whole_nodes_names_the_flags():
    with pytest.raises(ValueError, match=r"gpus=12 does not fill whole nodes of 8 GPUs \(h100-80gb's usual node"):
        PlanConfig(gpus=(4, 12))
    assert PlanConfig(gpus=(12,), nodes=1).nodes_for(12) == 1
    assert PlanConfig(gpus=(12,), gpus_per_node=4).nodes_for(12) == 3
    assert PlanConfig(gpus=(12,), device="cpu").nodes_for(12) == 1
    with pytest.raises(ValueError, match="gpus=12 is not a multiple of gpus_per_node=8"):
        PlanConfig(gpus=(12,), gpus_per_node=8)
    with pytest.raises(ValueError, match="not both"):
        PlanConfig(gpus=(8,), nodes=1, gpus_per_node=8)
    with pytest.raises(ValueError, match=r"headroom_pct must be in \[0, 100\)"):
        PlanConfig(headroom_pct=100)


def test_a_plan_config_saved_before_nodes_and_headroom_reads_back_as_it_was_planned():
    """Before: nodes 1 beside gpus_per_node, and fits against the whole capacity (no headroom)."""
    old = {k: v for k, v in PlanConfig(gpus_per_node=8).to_json().items() if k != "headroom_pct"}
    back = PlanConfig.from_json({**old, "nodes": 1, "gpus": [8, 16]})
    assert (back.nodes, back.gpus_per_node, back.nodes_for(16), back.headroom_pct) == (None, 8, 2, 0.0)
    assert PlanConfig.from_json({**old, "nodes": 1, "gpus_per_node": None}).nodes_for(16) == 1


def test_headroom_is_one_option_in_estimate_and_profile():
    (estimate,) = [p for p in main.commands["estimate"].params if p.name == "headroom_pct"]
    (profile,) = [p for p in main.commands["profile"].params if p.name == "headroom_pct"]
    assert estimate.opts == profile.opts == ["--headroom"]
    assert estimate.default == profile.default == PlanConfig().headroom_pct == ProfileConfig().headroom_pct == 10.0
    assert estimate.help == profile.help and estimate.type == profile.type
