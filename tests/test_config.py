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
