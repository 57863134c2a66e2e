"""Plans with pipeline parallelism: every pipeline rank in plan.json, a line per estimate under
the terminal table, and a bar per rank in the HTML report (a hand-built plan, tests/records.py)."""

import json
from dataclasses import replace

import pytest
from rich.console import Console

from dpplan.planner.plan import PlanDocument
from dpplan.reports.html_report import render_report
from dpplan.reports.plan_html import plan_page
from dpplan.reports.plan_table import render_plan
from dpplan.reports.stage_text import owns_text, stage_parts
from dpplan.reports.units import GiB
from tests.records import pipeline_plan_document, stage_estimate

CATEGORIES = ("params", "grads", "optimizer", "activations", "other")


@pytest.fixture
def document() -> PlanDocument:
    return pipeline_plan_document()


def _render(document: PlanDocument, width: int) -> list[str]:
    console = Console(width=width, record=True)
    render_plan(document, console)
    return [line.rstrip() for line in console.export_text().splitlines()]


def _stage_block(lines: list[str]) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith("Pipeline stages"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(("  ", "in flight"))), len(lines))
    return lines[start:end]


def test_the_header_names_the_pipeline_and_the_rows_their_layout(document):
    lines = _render(document, 200)
    assert any("· pipeline parallel 4 (1f1b, 8 micro-batches) ·" in line for line in lines)
    rows = [line.split() for line in lines]
    assert ["4", "pp4", "single", "12.50"] in [row[:4] for row in rows]
    assert ["8", "dp2", "x", "pp4", "ddp", "13.00"] in [row[:6] for row in rows]


def test_a_line_per_estimate_names_its_heaviest_and_lightest_rank_at_80_columns(document):
    """Rank 2 is the lightest (the head makes the last rank heavier); the parts are kept whole
    and a line goes on indented."""
    lines = _render(document, 80)
    assert max(len(line) for line in lines) <= 80
    assert _stage_block(lines) == [
        "Pipeline stages per GPU ·",
        "in flight: micro-batches whose activations pp rank 0, 1, ... hold at once:",
        "  single on 4 GPUs: heaviest pp rank 0 12.50 GiB (embedding, layers 0-1) ·",
        "    lightest pp rank 2 8.75 GiB · in flight 4/3/2/1",
        "  ddp on 8 GPUs: heaviest pp rank 0 13.00 GiB (embedding, layers 0-1) ·",
        "    lightest pp rank 2 9.25 GiB · in flight 4/3/2/1",
    ]


def test_a_wide_terminal_has_each_estimates_stages_on_one_line(document):
    assert _stage_block(_render(document, 160)) == [
        "Pipeline stages per GPU · in flight: micro-batches whose activations pp rank 0, 1, ... hold at once:",
        "  single on 4 GPUs: heaviest pp rank 0 12.50 GiB (embedding, layers 0-1) · lightest pp rank 2 8.75 GiB · "
        "in flight 4/3/2/1",
        "  ddp on 8 GPUs: heaviest pp rank 0 13.00 GiB (embedding, layers 0-1) · lightest pp rank 2 9.25 GiB · "
        "in flight 4/3/2/1",
    ]


def test_a_plan_without_stages_has_no_stage_lines_or_section(document):
    plan = document.plan
    flat = replace(document, plan=replace(plan, estimates=[replace(e, stages=[]) for e in plan.estimates]))
    assert not any(line.startswith("Pipeline stages") for line in _render(flat, 120))
    assert "stages" not in [section.anchor for section in plan_page(flat).sections]


def test_a_rank_of_two_stages_says_which_and_a_tie_names_no_rank():
    zbv = stage_estimate(stages=[0, 7], owns=["embedding", "layers 0-1", "layers 14-15", "head"])
    assert owns_text(zbv) == "stages 0, 7: embedding, layers 0-1, layers 14-15, head"
    (estimate,) = pipeline_plan_document().plan.estimates[:1]
    even = replace(estimate, stages=[replace(s, peak_bytes=GiB) for s in estimate.stages])
    assert stage_parts(even) == ["single on 4 GPUs: every pp rank 1.00 GiB", "in flight 4/3/2/1"]


def test_plan_json_has_every_stage_in_pipeline_order_and_reads_back(document):
    text = json.dumps(document.to_json(), indent=2)
    data = json.loads(text)
    for written, planned in zip(data["estimates"], document.plan.estimates, strict=True):
        assert written["pp_schedule"] == "1f1b" and written["pp"] == 4
        assert [s["pp_rank"] for s in written["stages"]] == [0, 1, 2, 3]
        assert [s["in_flight"] for s in written["stages"]] == [4, 3, 2, 1]
        assert written["stages"][3]["owns"] == ["layers 6-7", "head"]
        assert [s["peak_bytes"] for s in written["stages"]] == [s.peak_bytes for s in planned.stages]
    assert data["estimates"][1]["stages"][2]["peak_bytes"] == int(9.25 * GiB)
    back = PlanDocument.from_json(data)
    assert back == document
    assert [e.stages for e in back.plan.estimates] == [e.stages for e in document.plan.estimates]
    assert json.dumps(back.to_json(), indent=2) == text


def _stage_figure(document: PlanDocument):
    page = plan_page(document)
    (section,) = [s for s in page.sections if s.anchor == "stages"]
    return page, section, next(b for b in section.blocks if getattr(b, "name", "") == "pipeline-stages").figure


def test_html_draws_a_stacked_bar_per_pipeline_rank_with_the_capacity(document):
    page, section, figure = _stage_figure(document)
    assert [s.anchor for s in page.sections][:3] == ["fits", "breakdown", "stages"]
    assert "pipeline parallel 4 (1f1b, 8 micro-batches)" in page.subtitle
    assert [trace.name for trace in figure.data][:2] == ["parameters", "gradients"] and len(figure.data) == 5
    groups = ["single on 4 GPUs"] * 4 + ["ddp on 8 GPUs"] * 4
    ranks = [f"pp rank {r}" for r in range(4)] * 2
    assert [list(figure.data[0].x[0]), list(figure.data[0].x[1])] == [groups, ranks]
    by_name = {trace.name: list(trace.y) for trace in figure.data}
    assert by_name["parameters"] == [2.0, 1.5, 1.5, 2.0] * 2
    assert by_name["activations"] == [4.0, 3.0, 2.25, 1.0] * 2
    assert by_name["other (buffers, comm. buffers, CUDA context, allocator)"] == [0.5] * 4 + [1.0] * 4
    stacked = [sum(trace.y[i] for trace in figure.data) for i in range(8)]
    assert stacked == [12.5, 9.5, 8.75, 9.5, 13.0, 10.0, 9.25, 10.0]
    assert [list(c) for c in figure.data[0].customdata[:2]] == [["embedding, layers 0-1", 4], ["layers 2-3", 3]]
    (capacity,) = [shape.y0 for shape in figure.layout.shapes if shape.y0 == shape.y1]
    assert capacity == 80.0  # the records' 80 GiB, no headroom: no dotted line


def test_html_stage_table_and_summary_give_each_ranks_numbers(document):
    _, section, _ = _stage_figure(document)
    callout, _, table = section.blocks
    assert callout.lines[1] == ("ddp on 8 GPUs: heaviest pp rank 0 13.00 GiB (embedding, layers 0-1) · "
                                "lightest pp rank 2 9.25 GiB · in flight 4/3/2/1")
    assert table.headers[:7] == ["GPUs", "strategy", "pp rank", "holds", "parameters", "in flight", "peak GiB"]
    assert table.rows[3] == ["4", "single", "3", "layers 6-7, head", "4.00M", "1", "9.50", "2.00", "2.00", "4.00",
                             "1.00", "0.50", "yes", "1", "backward"]
    assert len(table.rows) == 8
    html = render_report(document, plotlyjs="cdn")
    assert 'id="fig-pipeline-stages"' in html and "layers 6-7, head" in html
