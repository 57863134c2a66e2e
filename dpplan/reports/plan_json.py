"""Writing plan.json: the ``PlanDocument`` of a plan (planner/plan.py, where its schema is), with
the version, the time and the command that made it, and the CPU kernels it was planned for.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from dpplan import __version__
from dpplan.errors import UsageError
from dpplan.planner.cpu_kernels import cpu_description
from dpplan.planner.plan import Plan, PlanDocument


def plan_document(plan: Plan, *, command: str | None = None) -> PlanDocument:
    return PlanDocument(
        plan=plan,
        dpplan_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        # cpu target: the kernels' instruction set and threads the in-op buffers were measured with
        cpu_kernels=cpu_description() if plan.config.device == "cpu" else None,
    )


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
