"""``--html`` and ``dpplan report``: any dpplan JSON (an estimate or a profile) as one HTML file.

The JSON is read back into its typed document first (planner/plan.py ``PlanDocument``,
profiler/profile_document.py ``ProfileDocument``); the pages draw only those.
"""

from __future__ import annotations

from pathlib import Path

from dpplan.errors import DpplanError, UsageError
from dpplan.json_file import SCHEMA_VERSION, read_json
from dpplan.planner.plan import PlanDocument
from dpplan.profiler.profile_document import ProfileDocument
from dpplan.reports.html_page import render_page

DOCUMENT_TYPES: dict[str, type[PlanDocument] | type[ProfileDocument]] = {"estimate": PlanDocument, "profile": ProfileDocument}
KINDS = tuple(DOCUMENT_TYPES)


def document_from_json(data: dict) -> PlanDocument | ProfileDocument:
    """A plan or profile JSON (by its ``kind``) as its typed document; UsageError (one line)
    when it is neither or does not read back."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in DOCUMENT_TYPES:
        raise UsageError(f"not a dpplan estimate or profile JSON (kind {kind!r}; expected one of {', '.join(KINDS)})")
    try:
        return DOCUMENT_TYPES[kind].from_json(data)
    except DpplanError:
        raise
    except ValueError as exc:  # the file is the user's input: a usage error, not a bug of ours
        raise UsageError(str(exc)) from None


def render_report(document: PlanDocument | ProfileDocument | dict, *, plotlyjs: str = "inline") -> str:
    """The HTML report of a plan or a profile: its document, or its JSON read back into one."""
    if not isinstance(document, (PlanDocument, ProfileDocument)):
        document = document_from_json(document)
    if isinstance(document, PlanDocument):
        from dpplan.reports.plan_html import plan_page

        page = plan_page(document)
    else:
        from dpplan.reports.profile_html import profile_page

        page = profile_page(document)
    return render_page(page, plotlyjs=plotlyjs)


def read_document(path: str) -> dict:
    """A dpplan JSON file, with one-line errors for a missing or malformed file."""
    document = read_json(path)
    if not isinstance(document, dict) or document.get("kind") not in KINDS:
        raise UsageError(f"{path} is not a dpplan estimate or profile JSON (no \"kind\": estimate|profile)")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(
            f"{path}: schema_version {document.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})")
    return document


def write_report(document: PlanDocument | ProfileDocument | dict, destination: str, *,
                 plotlyjs: str = "inline") -> Path:
    """Render and write; the file appears whole or not at all."""
    path = Path(destination)
    text = render_report(document, plotlyjs=plotlyjs)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)
    return path
