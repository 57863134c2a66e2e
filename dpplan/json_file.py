"""dpplan's JSON files: reading a user's file with one-line errors (a DeepSpeed config, a saved
plan or profile), and what every document dpplan writes shares."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from dpplan.errors import UsageError

SCHEMA_VERSION = 1
"""The ``schema_version`` of plan.json and profile.json."""
TOOL_NAME = "dpplan"


def read_json(path: str):
    """The JSON value in ``path``; ValueError (one line) if it is missing or not JSON."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None


def known_fields(cls, data: dict) -> dict:
    """The keys of ``data`` that are fields of the dataclass ``cls``: a record read back leaves
    out what a newer dpplan added."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
