import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def tiny_mlp() -> str:
    return str(FIXTURES / "tiny_mlp.py")


@pytest.fixture
def tiny_gpt() -> str:
    return str(FIXTURES / "tiny_gpt.py")


@pytest.fixture
def write_model(tmp_path):
    """Write a model file from source text; returns its path as a string."""

    def write(source: str, name: str = "model.py") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return str(path)

    return write


@dataclass(frozen=True)
class ProfileRun:
    """One real `dpplan profile` on 2 CPU ranks, shared by the tests that read its outputs."""

    output: str
    exit_code: int
    out_dir: Path
    json_copy: Path
    html: Path

    @property
    def document(self) -> dict:
        return json.loads((self.out_dir / "profile.json").read_text())


@pytest.fixture(scope="session")
def cpu_profile(tmp_path_factory) -> ProfileRun:
    """ddp and fsdp2 of the tiny GPT on 2 CPU ranks (gloo), with --json and --html: ~40 s, run once."""
    from dpplan.cli import main

    root = tmp_path_factory.mktemp("cpu_profile")
    out, copy, html = root / "out", root / "copy.json", root / "profile.html"
    result = CliRunner().invoke(
        main,
        ["profile", str(FIXTURES / "tiny_gpt.py"), "--device", "cpu", "--gpus", "2", "--strategy", "ddp,fsdp2",
         "--batch-size", "2", "--steps", "2", "--out", str(out), "--json", str(copy), "--html", str(html)],
        catch_exceptions=False,
    )
    return ProfileRun(output=result.output, exit_code=result.exit_code, out_dir=out, json_copy=copy, html=html)
