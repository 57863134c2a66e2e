"""planner/plan.py PlanDocument: plan.json read back is the plan that was written, key order and all."""

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from dpplan.cli import main
from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.estimate import estimate
from dpplan.planner.plan import PlanDocument
from dpplan.reports.html_report import document_from_json, render_report
from dpplan.reports.plan_json import plan_document


def _text(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"  # as write_json writes it


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_real_plan_reads_back_to_the_same_json(tiny_mlp, device):
    plan = estimate(PlanConfig(run=RunSpec(model=tiny_mlp, offload="optimizer"), strategies=("ddp", "fsdp-full", "zero2"),
                               gpus=(1, 2), device=device))
    plan = replace(plan, unsupported={"fsdp2": "refused by the wrapper (a made-up reason)"})
    document = plan_document(plan, command="dpplan estimate tiny_mlp.py")
    written = _text(document.to_json())
    back = PlanDocument.from_json(json.loads(written))
    assert back == document
    assert _text(back.to_json()) == written  # same keys, values and order
    assert back.plan.config == plan.config and back.plan.estimates == plan.estimates
    assert (back.cpu_kernels is not None) == (device == "cpu")


def test_the_cli_writes_what_the_document_reads_back(tiny_gpt, tmp_path):
    path = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["estimate", tiny_gpt, "--gpus", "1,2", "--json", str(path)])
    assert result.exit_code == 0, result.output
    written = path.read_text()
    assert list(json.loads(written)) == ["schema_version", "kind", "tool", "created", "command", "config", "model",
                                         "estimates", "unsupported", "recommendation", "cpu_kernels"]
    assert _text(PlanDocument.from_json(json.loads(written)).to_json()) == written


def test_a_plan_that_does_not_fit_reads_back_with_its_changes(tiny_mlp):
    plan = estimate(PlanConfig(run=RunSpec(model=tiny_mlp), strategies=("ddp", "zero3"), gpus=(2,), capacity_bytes=1))
    assert plan.recommendation is not None and not plan.recommendation.fits and plan.recommendation.changes
    written = _text(plan_document(plan).to_json())
    back = PlanDocument.from_json(json.loads(written))
    assert back.plan.recommendation == plan.recommendation and _text(back.to_json()) == written


def test_a_plan_saved_before_headroom_and_recommendations_reads_back_as_planned(tiny_mlp):
    """Without headroom_pct and recommendation keys, and with nodes 1 beside gpus_per_node, as
    dpplan wrote them before: fits was judged against the whole capacity, nodes came from gpus_per_node."""
    plan = estimate(PlanConfig(run=RunSpec(model=tiny_mlp), strategies=("ddp",), gpus=(2, 16), gpus_per_node=2))
    data = json.loads(_text(plan_document(plan).to_json()))
    del data["recommendation"], data["config"]["headroom_pct"]
    data["config"]["nodes"] = 1
    for e in data["estimates"]:
        del e["headroom_pct"]
    back = PlanDocument.from_json(data)
    assert back.plan.recommendation is None and back.plan.config.headroom_pct == 0.0
    assert [e.headroom_pct for e in back.plan.estimates] == [0.0, 0.0]
    assert [back.plan.config.nodes_for(e.gpus) for e in back.plan.estimates] == [e.nodes for e in plan.estimates] == [1, 8]
    assert "recommended:" not in render_report(data, plotlyjs="cdn")


def test_a_json_and_its_document_draw_the_same_page(tiny_mlp):
    document = plan_document(estimate(PlanConfig(run=RunSpec(model=tiny_mlp), strategies=("ddp",), gpus=(1, 2))))
    data = json.loads(_text(document.to_json()))
    assert isinstance(document_from_json(data), PlanDocument)
    assert render_report(data, plotlyjs="cdn") == render_report(document, plotlyjs="cdn")


def test_an_incomplete_plan_json_is_a_one_line_usage_error(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"kind": "estimate", "schema_version": 1}')
    result = CliRunner().invoke(main, ["report", str(path), "-o", str(tmp_path / "plan.html")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: not a complete plan JSON: no 'config' key"
