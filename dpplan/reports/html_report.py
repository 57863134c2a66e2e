"""``--html`` and ``dpplan report``: any dpplan JSON (an estimate or a profile) as one HTML file."""

from __future__ import annotations

from pathlib import Path

from dpplan.errors import UsageError
from dpplan.json_file import read_json
from dpplan.profiler.profile_document import ProfileDocument
from dpplan.reports.html_page import render_page

KINDS = ("estimate", "profile")


def render_report(document: dict | ProfileDocument, *, plotlyjs: str = "inline") -> str:
    """The HTML report of a plan JSON (``kind: estimate``), or of a profile: a ProfileDocument or
    its profile.json (``kind: profile``), read back into one first."""
    kind = "profile" if isinstance(document, ProfileDocument) else (
        document.get("kind") if isinstance(document, dict) else None)
    if kind == "estimate":
        from dpplan.reports.plan_html import plan_page

        page = plan_page(document)
    elif kind == "profile":
        from dpplan.reports.profile_html import profile_page

        if not isinstance(document, ProfileDocument):
            document = ProfileDocument.from_json(document)
        page = profile_page(document)
    else:
        raise UsageError(f"not a dpplan estimate or profile JSON (kind {kind!r}; expected one of {', '.join(KINDS)})")
    return render_page(page, plotlyjs=plotlyjs)


def read_document(path: str) -> dict:
    """A dpplan JSON file, with one-line errors for a missing or malformed file."""
    document = read_json(path)
    if not isinstance(document, dict) or document.get("kind") not in KINDS:
        raise UsageError(f"{path} is not a dpplan estimate or profile JSON (no \"kind\": estimate|profile)")
    if document.get("schema_version") != 1:
        raise UsageError(f"{path}: schema_version {document.get('schema_version')!r} is not supported (expected 1)")
    return document


def write_report(document: dict | ProfileDocument, destination: str, *, plotlyjs: str = "inline") -> Path:
    """Render and write; the file appears whole or not at all."""
    path = Path(destination)
    text = render_report(document, plotlyjs=plotlyjs)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)
    return path
