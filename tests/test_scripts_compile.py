"""The benchmarks and scripts run outside the test suite; at least they must compile
(a broken string literal once sat in benchmarks/accuracy.py unnoticed)."""

import py_compile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("scripts/*.py")])


def test_there_are_scripts_to_check():
    assert any(path.name == "accuracy.py" for path in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)
