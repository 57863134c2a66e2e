"""Regenerate the README's report screenshots (docs/images/*.png) from real dpplan runs.

    python scripts/readme_screenshots.py                  # both reports
    python scripts/readme_screenshots.py --skip-profile   # only the estimate (seconds, not minutes)

Needs Chromium (Debian: apt install chromium) and playwright (pip install -e ".[test]").
The estimate plans the Llama-style 70B model of benchmarks/ on 8 to 128 H100s (about 20 s);
the profile runs the bundled GPT under ddp and fsdp2 on 2 CPU ranks (2 to 5 minutes on a
2-core machine).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
VIEWPORT = {"width": 1100, "height": 900}
CLIP_HEIGHT = 1500
"""Pixels from the top of the page: the header, the verdict and the first figures."""


def _dpplan(*args: str) -> None:
    command = [sys.executable, "-m", "dpplan.cli", *args]
    print("+ dpplan " + " ".join(args), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def _screenshot(html: Path, png: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no Chromium found (apt install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
        page.goto(html.resolve().as_uri())
        page.wait_for_function(
            "[...document.querySelectorAll('.js-plotly-plot')].every(p => p._fullLayout && p.querySelector('.main-svg'))"
        )
        height = min(CLIP_HEIGHT, page.evaluate("document.documentElement.scrollHeight"))
        page.screenshot(path=str(png), clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height})
        browser.close()
    print(f"wrote {png.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-profile", action="store_true", help="Only the estimate report.")
    args = parser.parse_args(argv)
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _dpplan("estimate", "benchmarks/models/llama_70b.py", "--gpus", "8,16,32,64,128", "--gpus-per-node", "8",
                "--activation-checkpointing", "--html", str(work / "plan.html"))
        _screenshot(work / "plan.html", IMAGES / "estimate-report.png")
        if not args.skip_profile:
            _dpplan("profile", "--device", "cpu", "--gpus", "2", "--strategy", "ddp,fsdp2", "--steps", "2",
                    "--out", str(work / "runs"), "--html", str(work / "profile.html"))
            _screenshot(work / "profile.html", IMAGES / "profile-report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
