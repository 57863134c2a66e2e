"""The HTML reports' numbers, checked before they are drawn, and the page around them."""

import copy
import json
import re

import pytest
from click.testing import CliRunner

from dpplan.cli import main
from dpplan.config import usable_bytes
from dpplan.planner.plan import PlanDocument
from dpplan.profiler.profile_document import ProfileDocument
from dpplan.reports.html_page import byte_unit, figure_text
from dpplan.reports.html_report import read_document, render_report
from dpplan.reports.plan_html import plan_page
from dpplan.reports.plan_recommendation import recommendation_line
from dpplan.reports.profile_html import profile_page
from dpplan.reports.units import GiB


@pytest.fixture(scope="module")
def plan_document(tmp_path_factory):
    from tests.conftest import FIXTURES

    path = tmp_path_factory.mktemp("plan") / "plan.json"
    result = CliRunner().invoke(main, ["estimate", str(FIXTURES / "tiny_gpt.py"), "--gpus", "1,2,4", "--json", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text())


def _figures(page):
    return {block.name: block.figure for section in page.sections for block in section.blocks
            if getattr(block, "kind", "") == "figure"}


def test_memory_bars_stack_to_each_estimates_peak(plan_document):
    bars = _figures(plan_page(PlanDocument.from_json(plan_document)))["memory-by-strategy"]
    estimates = plan_document["estimates"]
    assert [trace.name.split(" ")[0] for trace in bars.data] == ["parameters", "gradients", "optimizer", "activations", "other"]
    for index, estimate in enumerate(estimates):
        stacked = sum(trace.y[index] for trace in bars.data)
        assert stacked == pytest.approx(estimate["peak_bytes"] / GiB, rel=1e-12)
        assert bars.data[0].x[0][index] == f"{estimate['gpus']} GPU" + ("s" if estimate["gpus"] > 1 else "")
        assert bars.data[0].x[1][index] == estimate["strategy"]
    lines = [shape for shape in bars.layout.shapes if shape.y0 == shape.y1]
    capacity, usable = estimates[0]["capacity_bytes"], usable_bytes(estimates[0]["capacity_bytes"], 10.0)
    assert [line.y0 for line in lines] == [pytest.approx(capacity / GiB), pytest.approx(usable / GiB)]
    assert plan_document["recommendation"]["usable_bytes"] == usable


def test_what_fits_starts_with_the_recommendation_and_the_assumptions_say_the_headroom(plan_document):
    page = plan_page(PlanDocument.from_json(plan_document))
    first = page.sections[0].blocks[0]
    assert first.lines == [recommendation_line(PlanDocument.from_json(plan_document).plan.recommendation)]
    assumptions = dict(next(b for b in page.sections[-2].blocks if getattr(b, "rows", None)).rows)
    assert assumptions["headroom"] == "fits: peak <= 90% of the memory (10% headroom)"
    assert assumptions["nodes"] == "8 GPUs per node (h100-80gb's usual node)"


def test_fit_map_colours_by_share_of_the_gpu_and_marks_what_does_not_fit(plan_document):
    document = copy.deepcopy(plan_document)
    over = next(e for e in document["estimates"] if e["strategy"] == "ddp" and e["gpus"] == 2)
    over["peak_bytes"], over["fits"] = 2 * over["capacity_bytes"], False
    heatmap = _figures(plan_page(PlanDocument.from_json(document)))["fit-map"].data[0]
    assert list(heatmap.x) == ["1 GPU", "2 GPUs", "4 GPUs"]
    assert list(heatmap.y) == document["config"]["strategies"]
    row, column = heatmap.y.index("ddp"), 1
    assert heatmap.z[row][column] == 150.0  # clipped at the top of the scale
    assert heatmap.text[row][column].startswith("✗ ")
    single = heatmap.y.index("single")
    assert heatmap.z[single][1] is None and heatmap.text[single][1] == ""  # single runs on 1 GPU only
    first = document["estimates"][0]
    assert heatmap.z[heatmap.y.index(first["strategy"])][0] == pytest.approx(100 * first["peak_bytes"] / first["capacity_bytes"])


def test_largest_micro_batch_lines_follow_the_estimates(plan_document):
    traces = _figures(plan_page(PlanDocument.from_json(plan_document)))["max-batch"].data
    lines = {strategy: trace for trace in traces for strategy in trace.name.split(" = ")}
    assert len(lines) == sum(len(trace.name.split(" = ")) for trace in traces)  # each strategy on one line
    for estimate in plan_document["estimates"]:
        line = lines[estimate["strategy"]]
        label = f"{estimate['gpus']} GPU" + ("s" if estimate["gpus"] > 1 else "")
        assert line.y[list(line.x).index(label)] == estimate["max_batch_size"]


def test_lines_that_coincide_stay_visible(plan_document):
    """Strategies with the same largest micro-batch at every GPU count are one line named for all
    (fsdp-full and fsdp-hybrid on one node); the other lines differ in dash and marker."""
    traces = _figures(plan_page(PlanDocument.from_json(plan_document)))["max-batch"].data
    points = [tuple(zip(trace.x, trace.y)) for trace in traces]
    assert len(set(points)) == len(points)
    assert "fsdp-full = fsdp-hybrid" in [trace.name for trace in traces]
    styles = [(trace.line.dash, trace.marker.symbol) for trace in traces]
    assert len(set(styles)) == len(styles) and len({symbol for _, symbol in styles}) == len(styles)


def test_legends_sit_below_the_plots_and_level_labels_in_the_margin(plan_document, gpu_profile_document):
    """Legends along the bottom edge (the modebar is at the top right), and the labels of the
    capacity and limit lines right of the plot, beside the line, never on a bar or a marker."""
    plan_figures = _figures(plan_page(PlanDocument.from_json(plan_document)))
    profile_figures = _figures(profile_page(ProfileDocument.from_json(gpu_profile_document)))
    for name, figure in {**plan_figures, **profile_figures}.items():
        legend = figure.layout.legend
        assert (legend.yref, legend.y, legend.yanchor, legend.orientation) == ("container", 0, "bottom", "h"), name
    capacity = plan_document["estimates"][0]["capacity_bytes"] / GiB
    limit = gpu_profile_document["recommendations"]["limit_bytes"]
    for figure, level, text in ((plan_figures["memory-by-strategy"], capacity, "GPU memory<br>"),
                                (profile_figures["batch-search"], limit / byte_unit(limit)[1], "limit ")):
        (label,) = [a for a in figure.layout.annotations if a.text.startswith(text)]
        assert (label.xref, label.x, label.xanchor, label.yref) == ("paper", 1, "left", "y")  # right of the plot
        assert label.y == pytest.approx(level)
        assert figure.layout.margin.r >= 120


def test_subtitles_name_checkpointing_and_the_sequence(plan_document, cpu_profile):
    page = plan_page(PlanDocument.from_json(plan_document))
    model = plan_document["model"]
    assert f"sequence {model['seq_len']} ({model['tokens_per_micro_batch']} tokens per micro-batch)" in page.subtitle
    assert "activation checkpointing off" in page.subtitle
    checkpointed = copy.deepcopy(plan_document)
    checkpointed["config"]["activation_checkpointing"] = True
    checkpointed["model"]["checkpointing"] = "units"
    assert "activation checkpointing on (per unit)" in plan_page(PlanDocument.from_json(checkpointed)).subtitle
    profile = cpu_profile.document
    subtitle = profile_page(ProfileDocument.from_json(profile)).subtitle
    assert f"sequence {profile['model']['seq_len']} · activation checkpointing off" in subtitle


def test_the_activation_section_names_the_strategy_it_was_traced_for(plan_document):
    page = plan_page(PlanDocument.from_json(plan_document))
    section = next(s for s in page.sections if s.anchor == "activations")
    assert section.title == "Activation memory by module: single on 1 GPU"  # the first strategy asked (all)
    assert "on one rank of single on 1 GPU" in section.blocks[0].caption


def test_activation_modules_in_a_readable_unit(plan_document):
    bars = _figures(plan_page(PlanDocument.from_json(plan_document)))["activation-modules"].data[0]
    modules = plan_document["model"]["top_activation_modules"]
    unit, size = byte_unit(max(m["activation_bytes"] for m in modules))
    assert unit == "KiB"  # the tiny GPT keeps tens of KiB per module
    assert list(bars.x) == [m["activation_bytes"] / size for m in modules]


def test_byte_unit_and_figure_text():
    assert byte_unit(None) == ("B", 1) and byte_unit(1023) == ("B", 1)
    assert byte_unit(1024) == ("KiB", 1024) and byte_unit(3 * 2**30) == ("GiB", 2**30)
    assert figure_text('<b a="1">&') == '&lt;b a="1"&gt;&amp;'


def test_page_has_title_model_date_and_command_and_embeds_plotly_once(plan_document):
    html = render_report(plan_document)
    assert "<title>dpplan memory plan · tiny_gpt.py</title>" in html
    assert plan_document["created"] in html
    assert "dpplan estimate" in html and "--gpus 1,2,4" in html
    assert html.count("Plotly.newPlot(") == 4
    assert len(re.findall(r"plotly\.js v\d", html)) == 1  # the library's banner: embedded exactly once
    assert not re.search(r"<script[^>]*\bsrc=", html)  # nothing to fetch: it opens offline


def test_cdn_mode_links_plotly_instead_of_embedding_it(plan_document):
    inline, cdn = render_report(plan_document), render_report(plan_document, plotlyjs="cdn")
    assert re.search(r'<script [^>]*src="https://cdn\.plot\.ly/plotly-[\d.]+\.min\.js"', cdn)
    assert not re.search(r"plotly\.js v\d", cdn)
    assert len(cdn) < 300_000 < 4_000_000 < len(inline)
    with pytest.raises(ValueError, match="--plotlyjs"):
        render_report(plan_document, plotlyjs="local")


def test_profile_page_draws_the_profiles_numbers(cpu_profile):
    assert cpu_profile.exit_code == 0, cpu_profile.output
    document = cpu_profile.document
    page = profile_page(ProfileDocument.from_json(document))
    assert [s.anchor for s in page.sections][:2] == ["recommendation", "accuracy"]
    figures = _figures(page)
    comparison = figures["estimate-vs-measured"]
    unit, size = byte_unit(max(r["measured"]["peak_allocated_bytes"] for r in document["runs"]))
    measured, estimated = comparison.data[0], comparison.data[1]
    for index, run in enumerate(document["runs"]):
        assert measured.y[index] == run["measured"]["peak_allocated_bytes"] / size
        assert estimated.y[index] == run["estimate"]["peak_bytes"] / size
        assert comparison.layout.annotations[index].text == f"error {run['error_pct']:+.2f}%"
    over_time = figures["memory-over-time-0"]
    ddp = document["runs"][0]
    for trace, rank in zip(over_time.data, ddp["measured"]["per_rank"]):
        assert list(trace.y) == [b / size for b in rank["memory_series"]["lines"]["allocated"]["bytes"]]
    speed = figures["speed"]
    assert list(speed.data[0].y) == [1000 * r["measured"]["step_time_s"] for r in document["runs"]]


def test_an_interrupted_profile_without_runs_still_renders(cpu_profile):
    document = copy.deepcopy(cpu_profile.document)
    document.update(runs=[], recommendations=None, interrupted=True)
    html = render_report(document)
    assert "Interrupted before the recommendations were made" in html
    assert "Plotly.newPlot(" not in html


def test_report_command_rerenders_a_saved_json_identically(tiny_mlp, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["estimate", tiny_mlp, "--gpus", "1,2", "--json", str(tmp_path / "plan.json"),
                                  "--html", str(tmp_path / "first.html"), "--plotlyjs", "cdn"])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'first.html'}" in result.output
    first = (tmp_path / "first.html").read_text()
    result = runner.invoke(main, ["report", str(tmp_path / "plan.json"), "--plotlyjs", "cdn"])  # -> plan.html
    assert result.exit_code == 0 and result.output == f"wrote {tmp_path / 'plan.html'}\n"
    assert (tmp_path / "plan.html").read_text() == first
    result = runner.invoke(main, ["report", str(tmp_path / "plan.json"), "-o", str(tmp_path / "again.html")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "again.html").read_text()) > len(first)  # plotly.js inline by default


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, [], "error: no such file: "),
        ("{not json", [], "is not JSON"),
        ('{"kind": "other"}', [], "is not a dpplan estimate or profile JSON"),
        ('{"kind": "estimate", "schema_version": 2}', [], "schema_version 2 is not supported"),
        ('{"kind": "estimate", "schema_version": 1}', ["-o", "/no/such/dir/r.html"], "--output: directory does not exist"),
    ],
)
def test_report_command_bad_input_is_one_line_and_exit_2(tmp_path, content, args, message):
    path = tmp_path / "in.json"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(main, ["report", str(path), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_estimate_refuses_a_bad_html_path_before_planning(tiny_mlp):
    result = CliRunner().invoke(main, ["estimate", tiny_mlp, "--html", "/no/such/dir/plan.html"])
    assert result.exit_code == 2 and result.output.strip() == "error: --html: directory does not exist: /no/such/dir"


def test_read_document_accepts_both_kinds(tmp_path, plan_document, cpu_profile):
    (tmp_path / "plan.json").write_text(json.dumps(plan_document))
    assert read_document(str(tmp_path / "plan.json"))["kind"] == "estimate"
    assert read_document(str(cpu_profile.out_dir / "profile.json"))["kind"] == "profile"


def test_gpu_profile_page_draws_nvml_and_torch_lines_with_both_estimates(gpu_profile_document):
    document = gpu_profile_document
    figures = _figures(profile_page(ProfileDocument.from_json(document)))
    over_time = figures["memory-over-time-0"]
    assert [t.name for t in over_time.data] == [
        f"rank {r} {kind}" for r in (0, 1) for kind in (
            "torch allocated (phase start, phase peak)", "torch reserved (phase start, phase peak)",
            "NVML used (whole device)")
    ]
    unit, size = byte_unit(document["runs"][0]["estimate"]["peak_bytes"])
    assert unit == "MiB"
    lines = sorted(shape.y0 for shape in over_time.layout.shapes if shape.y0 == shape.y1 and shape.y0)
    estimate = document["runs"][0]["estimate"]
    assert lines == pytest.approx([estimate["peak_allocated_bytes"] / size, estimate["peak_bytes"] / size])
    comparison = figures["estimate-vs-measured"]
    assert comparison.data[2].name == "measured NVML used (whole device)"
    html = render_report(document)
    assert "NVML used" in html and "reserved" in html


def test_ranks_that_allocate_alike_stay_visible(gpu_profile_document):
    """Each rank's lines have a width and a marker of their own, each rank thinner than the one
    before, so a rank drawn over an identical one leaves its edges showing."""
    over_time = _figures(profile_page(ProfileDocument.from_json(gpu_profile_document)))["memory-over-time-0"]
    styles: dict[int, set] = {}
    for trace in over_time.data:
        styles.setdefault(int(trace.name.split()[1]), set()).add((trace.line.width, trace.marker.symbol))
    assert sorted(styles) == [0, 1] and all(len(style) == 1 for style in styles.values())
    (width_0, symbol_0), (width_1, symbol_1) = styles[0].pop(), styles[1].pop()
    assert width_0 > width_1 and symbol_0 != symbol_1


def test_batch_search_trials_are_drawn_against_the_limit(gpu_profile_document):
    # conftest: trials at micro-batch 64 (ok, half the limit), 128 (over the limit), 96 (OOM, no peak)
    document = gpu_profile_document
    limit = document["recommendations"]["limit_bytes"]
    figure = _figures(profile_page(ProfileDocument.from_json(document)))["batch-search"]
    by_name = {trace.name: trace for trace in figure.data}
    unit, size = byte_unit(limit + 1)
    assert list(by_name["ok"].x) == [64] and by_name["ok"].y[0] == (limit // 2) / size
    assert list(by_name["over limit"].x) == [128]
    assert by_name["oom"].y[0] == limit / size  # no peak: drawn on the limit line
    assert list(by_name["recommended"].x) == [64]
    assert figure.layout.shapes[0].y0 == limit / size


def test_strategies_that_never_fit_are_named_not_drawn(plan_document):
    document = copy.deepcopy(plan_document)
    for e in document["estimates"]:
        if e["strategy"] in ("ddp", "zero2"):
            e["max_batch_size"], e["fits"] = 0, False
    page = plan_page(PlanDocument.from_json(document))
    figure = _figures(page)["max-batch"]
    assert "ddp" not in {trace.name for trace in figure.data} and "fsdp2" in {trace.name for trace in figure.data}
    caption = next(b.caption for s in page.sections for b in s.blocks if getattr(b, "name", "") == "max-batch")
    assert caption.endswith("fits at no GPU count planned: ddp, zero2.")
    for e in document["estimates"]:
        e["max_batch_size"], e["fits"] = 0, False
    page = plan_page(PlanDocument.from_json(document))
    assert "max-batch" not in _figures(page)
    assert "No strategy fits" in render_report(document)
