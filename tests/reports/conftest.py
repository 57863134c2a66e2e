"""A real headless Chromium for the HTML report tests (Debian's chromium, driven by playwright).

Without a Chromium the browser tests skip, except where DPPLAN_REQUIRE_BROWSER=1 (CI sets it,
after installing chromium), where a missing browser fails them.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags for a sandboxed machine with no network (root, no GPU, no Google services): without the
# background-networking ones Chromium keeps trying to reach the network at every start.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
VIEWPORT = {"width": 1100, "height": 900}
MiB = 1 << 20


def _chromium() -> str | None:
    explicit = os.environ.get("DPPLAN_CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def browser():
    required = os.environ.get("DPPLAN_REQUIRE_BROWSER") == "1"
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("DPPLAN_REQUIRE_BROWSER=1 but playwright is not installed (pip install -e '.[test]')")
        pytest.skip("playwright is not installed")
    if executable is None:
        if required:
            pytest.fail("DPPLAN_REQUIRE_BROWSER=1 but no Chromium found (apt install chromium, or set DPPLAN_CHROMIUM)")
        pytest.skip("no Chromium on this machine (apt install chromium; CI installs it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class OpenedReport:
    page: object
    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def open_report(browser):
    """Open an HTML file in a fresh page; collect console errors, page errors, dialogs and requests."""
    contexts = []

    def open_(path: Path) -> OpenedReport:
        context = browser.new_context(viewport=VIEWPORT)
        contexts.append(context)
        page = context.new_page()
        opened = OpenedReport(page=page)
        page.on("console", lambda message: message.type == "error" and opened.console_errors.append(message.text))
        page.on("pageerror", lambda error: opened.console_errors.append(f"uncaught: {error}"))
        page.on("dialog", lambda dialog: (opened.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("request", lambda request: opened.requests.append(request.url))
        page.goto(path.resolve().as_uri(), wait_until="load")
        return opened

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def gpu_profile_document(cpu_profile) -> dict:
    """The CPU profile recast as a GPU one with a batch-size search (no GPU here to record one):
    NVML and torch allocated/reserved series per rank, with reserved = allocated + 2 MiB and NVML
    used = reserved + 500 MiB (context, NCCL)."""
    document = copy.deepcopy(cpu_profile.document)
    document["device"] = {"type": "cuda", "gpus": 2, "gpu": "h100-80gb", "description": "2 x NVIDIA H100 80GB HBM3"}
    for run in document["runs"]:
        measured, estimate = run["measured"], run["estimate"]
        estimate["peak_allocated_bytes"] = estimate["peak_bytes"]
        estimate["peak_reserved_bytes"] = estimate["peak_bytes"] + 2 * MiB
        estimate["peak_bytes"] += 502 * MiB
        measured["peak_reserved_bytes"] = measured["peak_allocated_bytes"] + 2 * MiB
        measured["peak_nvml_bytes"] = measured["peak_reserved_bytes"] + 500 * MiB
        for rank in measured["per_rank"]:
            allocated = rank["memory_series"]["lines"]["allocated"]
            rank["memory_series"]["lines"] = {
                "allocated": dict(allocated, label="torch allocated (phase start, phase peak)"),
                "reserved": dict(allocated, label="torch reserved (phase start, phase peak)",
                                 bytes=[b + 2 * MiB for b in allocated["bytes"]]),
                "nvml_used": dict(allocated, label="NVML used (whole device)",
                                  bytes=[b + 502 * MiB for b in allocated["bytes"]]),
            }
    # ... as if run with --find-batch-size: three trials of the first strategy.
    section = document["recommendations"]
    limit = section["limit_bytes"]
    section["strategies"][0].update(status="confirmed", batch_size=64, peak_bytes=limit // 2, search={
        "num_trials": 3, "converged": True, "stop_reason": "bracketed", "smallest_rejected": 96, "trials": [
            {"batch_size": 64, "status": "ok", "accepted": True, "peak_bytes": limit // 2, "limit_bytes": limit},
            {"batch_size": 128, "status": "over_limit", "accepted": False, "peak_bytes": limit + 1, "limit_bytes": limit},
            {"batch_size": 96, "status": "oom", "accepted": False, "peak_bytes": None, "limit_bytes": limit},
        ]})
    return document
