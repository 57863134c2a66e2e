"""The machine-readable plan: ``{"schema_version": 1, "model": {...}, "estimates": [...]}``.

Scripts depend on these names; add fields freely, rename or remove only with a new
``schema_version``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from dpplan import __version__
from dpplan.errors import UsageError
from dpplan.planner.cpu_kernels import cpu_description
from dpplan.planner.plan import Plan

SCHEMA_VERSION = 1


def plan_to_json(plan: Plan, *, command: str | None = None) -> dict:
    model = asdict(plan.model)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "estimate",
        "tool": {"name": "dpplan", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": plan.config.to_json(),
        "model": model,
        "estimates": [asdict(e) for e in plan.estimates],
        "unsupported": dict(plan.unsupported),
        # cpu target: the kernels' instruction set and threads the in-op buffers were measured with
        "cpu_kernels": cpu_description() if plan.config.device == "cpu" else None,
    }


def write_json(data: dict, destination: str) -> None:
    """``destination`` is a path or ``-`` for standard output."""
    text = json.dumps(data, indent=2) + "\n"
    if destination == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(destination)
    if path.parent and not path.parent.exists():
        raise UsageError(f"--json: directory does not exist: {path.parent}")
    path.write_text(text)
