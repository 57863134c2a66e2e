"""The HTML reports in a real headless Chromium: no console error, every figure drawn, no script
from a model's names run. Screenshots are kept in each test's temp dir (printed with -s)."""

from pathlib import Path

from click.testing import CliRunner

from dpplan.cli import main
from dpplan.planner.strategies import STRATEGIES

FIGURES_DRAWN = """
() => [...document.querySelectorAll('[data-figure]')].map(block => {
    const plot = block.querySelector('.js-plotly-plot');
    const box = plot ? plot.getBoundingClientRect() : {width: 0, height: 0};
    return {
        name: block.dataset.figure,
        drew: Boolean(plot && plot._fullLayout && plot.querySelector('.main-svg')),
        traces: plot && plot.data ? plot.data.length : 0,
        marks: plot ? plot.querySelectorAll('.point, .trace path, .hm image, .heatmaplayer image').length : 0,
        width: box.width,
        height: box.height,
    };
})
"""
ALL_DRAWN = """
() => [...document.querySelectorAll('[data-figure] .js-plotly-plot')]
    .every(plot => plot._fullLayout && plot.querySelector('.main-svg'))
"""


def _estimate(*args):
    return CliRunner().invoke(main, ["estimate", *args], catch_exceptions=False)


def _check_drawn(opened, expected: set[str], screenshot: Path) -> list[dict]:
    page = opened.page
    page.wait_for_function(ALL_DRAWN, timeout=30_000)
    figures = page.evaluate(FIGURES_DRAWN)
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    assert opened.console_errors == []
    assert opened.dialogs == []
    assert {f["name"] for f in figures} == expected
    for figure in figures:
        assert figure["drew"] and figure["traces"] > 0 and figure["marks"] > 0, figure
        assert figure["width"] > 300 and figure["height"] > 200, figure
    # plotly.js is inside the file: nothing but the file itself was requested.
    assert all(url.startswith(("file:", "data:", "blob:")) for url in opened.requests), opened.requests
    assert screenshot.stat().st_size > 10_000
    return figures


def test_estimate_report_draws_every_figure(tiny_gpt, open_report, tmp_path):
    html = tmp_path / "plan.html"
    result = _estimate(tiny_gpt, "--gpus", "1,2,4", "--html", str(html))
    assert result.exit_code == 0, result.output
    opened = open_report(html)
    _check_drawn(opened, {"fit-map", "memory-by-strategy", "max-batch", "activation-modules"},
                 tmp_path / "estimate-report.png")
    page = opened.page
    assert page.title() == "dpplan memory plan · tiny_gpt.py"
    assert page.locator("section").first.get_attribute("id") == "fits"
    assert "dpplan estimate" in page.locator(".command").inner_text()
    # The map shows each strategy at each GPU count: single only at 1 GPU, every strategy in all.
    assert page.evaluate("document.getElementById('fig-fit-map').data[0].y.length") == len(STRATEGIES)


def test_profile_report_draws_every_figure_with_the_recommendation_first(cpu_profile, open_report, tmp_path):
    assert cpu_profile.exit_code == 0, cpu_profile.output
    opened = open_report(cpu_profile.html)
    _check_drawn(opened, {"estimate-vs-measured", "memory-over-time-0", "memory-over-time-1", "speed"},
                 tmp_path / "profile-report.png")
    page = opened.page
    assert page.locator("section").first.get_attribute("id") == "recommendation"
    assert "Recommended:" in page.locator(".callout").first.inner_text()
    # Two ranks drawn per run, and the estimated peak across.
    traces = page.evaluate("document.getElementById('fig-memory-over-time-0').data.map(t => t.name)")
    assert traces == ["rank 0 allocated tensor bytes (exact)", "rank 1 allocated tensor bytes (exact)"]
    shapes = page.evaluate("document.getElementById('fig-memory-over-time-0').layout.shapes.length")
    assert shapes >= 2  # warm-up band, step lines, estimated peak


def test_gpu_profile_report_draws_nvml_and_torch_lines_and_the_batch_search(gpu_profile_document, open_report, tmp_path):
    from dpplan.reports.html_report import write_report

    html = write_report(gpu_profile_document, str(tmp_path / "gpu-profile.html"))
    opened = open_report(html)
    _check_drawn(opened, {"batch-search", "estimate-vs-measured", "memory-over-time-0", "memory-over-time-1", "speed"},
                 tmp_path / "gpu-profile-report.png")
    assert opened.page.evaluate("document.getElementById('fig-memory-over-time-1').data.length") == 6


EVIL_CLASS = "<script>window.__pwned = 'class'</script>"
EVIL_MODULE = "<img src=x onerror=\"alert('module')\">"  # a module name may not contain "."
HOSTILE_MODEL = f'''
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return torch.relu(self.fc(x))


Block.__name__ = Block.__qualname__ = {EVIL_CLASS!r}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module({EVIL_MODULE!r}, Block())

    def forward(self, x):
        for child in self.children():
            x = child(x)
        return x


def build_model():
    return Model()


def example_batch(batch_size):
    return torch.randn(batch_size, 32)
'''


def test_hostile_names_are_shown_as_text_never_run(write_model, open_report, tmp_path):
    model = write_model(HOSTILE_MODEL, name="evil<img src=x onerror=\"window.__pwned='file'\">.py")
    html = tmp_path / "evil.html"
    result = _estimate(model, "--gpus", "1,2", "--html", str(html))
    assert result.exit_code == 0, result.output
    text = html.read_text()
    for hostile in (EVIL_CLASS, EVIL_MODULE, "<img src=x onerror=\"window.__pwned='file'\">"):
        assert hostile not in text
    opened = open_report(html)
    page = opened.page
    page.wait_for_function(ALL_DRAWN, timeout=30_000)
    page.screenshot(path=str(tmp_path / "hostile-report.png"), full_page=True)
    assert page.evaluate("window.__pwned") is None
    assert opened.dialogs == [] and opened.console_errors == []
    # ... and the names are shown as they are: in the page text and in the activation figure.
    assert "window.__pwned='file'" in page.locator("header").inner_text()
    labels = page.evaluate("[...document.querySelectorAll('#fig-activation-modules .ytick text')].map(t => t.textContent)")
    assert f"{EVIL_MODULE} ({EVIL_CLASS})" in labels
    assert all(url.startswith("file:") for url in opened.requests), opened.requests  # no <img src=x> fetched


# Boxes in page pixels of what a figure draws: its legend, its modebar, its axis labels, its bars,
# the labels of its level lines.
GEOMETRY = """
(id) => {
    const plot = document.getElementById(id);
    const box = element => {
        const r = element.getBoundingClientRect();
        return {left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width, height: r.height};
    };
    const legend = plot.querySelector('.legend');
    return {
        figure: box(plot),
        legend: legend ? box(legend) : null,
        modebar: box(plot.querySelector('.modebar')),
        axis_labels: [...plot.querySelectorAll('.xtick text, .g-xtitle text, .ytick text, .g-ytitle text')].map(box),
        bars: [...plot.querySelectorAll('.barlayer .point path')].map(box).filter(b => b.width > 0 && b.height > 0),
        levels: [...plot.querySelectorAll('.annotation')].filter(a => /GPU memory|RAM per rank|limit/.test(a.textContent))
            .map(a => box(a.querySelector('.annotation-text-g') || a)),
    };
}
"""


def _overlap(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def _geometry(page, name: str) -> dict:
    page.hover(f"#fig-{name} .main-svg")  # the modebar shows on hover
    return page.evaluate(GEOMETRY, f"fig-{name}")


def _inside(inner: dict, outer: dict) -> bool:
    return (inner["left"] >= outer["left"] - 0.5 and inner["right"] <= outer["right"] + 0.5
            and inner["top"] >= outer["top"] - 0.5 and inner["bottom"] <= outer["bottom"] + 0.5)


def _check_legends(opened, names: list[str]) -> None:
    for name in names:
        geometry = _geometry(opened.page, name)
        legend = geometry["legend"]
        assert legend and legend["width"] > 0, name
        assert not _overlap(legend, geometry["modebar"]), (name, legend, geometry["modebar"])
        assert not any(_overlap(legend, label) for label in geometry["axis_labels"]), name
        assert _inside(legend, geometry["figure"]), (name, legend, geometry["figure"])


def test_legends_meet_neither_the_modebar_nor_the_axis_labels(tiny_gpt, open_report, tmp_path):
    html = tmp_path / "plan.html"
    result = _estimate(tiny_gpt, "--gpus", "1,2,4", "--html", str(html))
    assert result.exit_code == 0, result.output
    opened = open_report(html)
    opened.page.wait_for_function(ALL_DRAWN, timeout=30_000)
    _check_legends(opened, ["memory-by-strategy", "max-batch"])
    opened.page.screenshot(path=str(tmp_path / "legends.png"), full_page=True)


def test_profile_legends_meet_neither_the_modebar_nor_the_axis_labels(gpu_profile_document, open_report, tmp_path):
    from dpplan.reports.html_report import write_report

    opened = open_report(write_report(gpu_profile_document, str(tmp_path / "gpu-profile.html")))
    opened.page.wait_for_function(ALL_DRAWN, timeout=30_000)
    _check_legends(opened, ["estimate-vs-measured", "memory-over-time-0", "batch-search"])


def test_the_capacity_label_sits_on_no_bar(tiny_gpt, open_report, tmp_path):
    """A capacity under every peak, so that every bar crosses the line: its label is beside
    the line, right of the plot, on no bar, and whole inside the figure."""
    import json

    from dpplan.reports.html_report import write_report

    path = tmp_path / "plan.json"
    result = _estimate(tiny_gpt, "--gpus", "1,2", "--json", str(path))
    assert result.exit_code == 0, result.output
    document = json.loads(path.read_text())
    capacity = min(e["peak_bytes"] for e in document["estimates"]) // 2
    for e in document["estimates"]:
        e["capacity_bytes"], e["fits"] = capacity, False
    opened = open_report(write_report(document, str(tmp_path / "over.html")))
    opened.page.wait_for_function(ALL_DRAWN, timeout=30_000)
    geometry = _geometry(opened.page, "memory-by-strategy")
    (label,) = geometry["levels"]
    assert len(geometry["bars"]) >= len(document["estimates"])  # the stacked bars are drawn (zero-high ones not)
    assert not any(_overlap(label, bar) for bar in geometry["bars"])
    assert _inside(label, geometry["figure"]) and not _overlap(label, geometry["modebar"])


def test_a_pipeline_plan_draws_a_bar_per_pipeline_rank(open_report, tmp_path):
    """A hand-built plan with --pp 4 (tests/records.py): the stage figure is drawn beside the
    others, with a bar for each of the eight pipeline ranks of its two estimates."""
    from dpplan.reports.html_report import write_report
    from tests.records import pipeline_plan_document

    opened = open_report(write_report(pipeline_plan_document(), str(tmp_path / "pipeline.html")))
    figures = _check_drawn(opened, {"fit-map", "memory-by-strategy", "pipeline-stages", "max-batch"},
                           tmp_path / "pipeline-report.png")
    stages = next(f for f in figures if f["name"] == "pipeline-stages")
    assert stages["traces"] == 5
    bars = opened.page.evaluate(
        "() => document.querySelectorAll('[data-figure=\"pipeline-stages\"] .trace.bars .point').length")
    assert bars == 5 * 8
