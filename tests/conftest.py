import textwrap
from pathlib import Path

import pytest

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
