"""Reading a user's JSON file with one-line errors (a DeepSpeed config, a saved plan or profile)."""

from __future__ import annotations

import json
from pathlib import Path

from dpplan.errors import UsageError


def read_json(path: str):
    """The JSON value in ``path``; ValueError (one line) if it is missing or not JSON."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
