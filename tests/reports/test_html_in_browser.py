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
