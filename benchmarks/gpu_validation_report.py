"""The GPU validation results in words: the summary written into each JSON, the printed table,
and README.md's block (between its gpu-validation markers), which is rendered from the JSON
files in docs/validation/ only, so the README cannot state a number no run measured
(tests/benchmarks/test_gpu_validation.py checks that the block is the rendering).
"""

from __future__ import annotations

import json
from pathlib import Path

import gpu_validation_cases as kit

from dpplan.reports.units import format_bytes

TARGETS = {
    "allocated": f"within {kit.ALLOCATED_TARGET_PCT:g} % of torch.cuda.max_memory_allocated",
    "reserved": f"within {kit.RESERVED_TARGET_PCT:g} % of torch.cuda.max_memory_reserved",
    "nvml": f"within {kit.NVML_TARGET_PCT:g} % or {kit.NVML_TARGET_BYTES / 2**30:g} GiB of NVML used (memory v2)",
    "largest_micro_batch": f"the OOM boundary at the predicted micro-batch +-{kit.BATCH_TARGET}",
    "sampler_step_overhead": f"< {kit.SAMPLER_TARGET_PCT:g} % slower median step with the 100 Hz sampler",
    "cuda_context": "as nvml (it is part of NVML used)",
    "cublas_workspace": "as allocated (it is part of the allocated bytes)",
}
README_START = "<!-- gpu-validation -->"
README_END = "<!-- /gpu-validation -->"
STATUSES = ("ok", "failed", "oom", "killed", "skipped")


def summarize(cases: list[dict]) -> dict:
    """Counts of case statuses and of the quantities compared against a target."""
    compared = [(c["id"], q) for c in cases for q in c["quantities"] if q["within_target"] is not None]
    return {
        "num_cases": len(cases),
        **{f"num_{status}": sum(c["status"] == status for c in cases) for status in STATUSES},
        "num_skipped_budget": sum(c["status"] == "skipped" and (c["reason"] or "").startswith("budget") for c in cases),
        "num_compared": len(compared),
        "num_within_target": sum(q["within_target"] for _, q in compared),
        "outside_target": [f"{case_id} {q['name']}" for case_id, q in compared if not q["within_target"]],
    }


def _value(quantity: dict, key: str) -> str:
    value = quantity[key]
    if value is None:
        return "-"
    if quantity["unit"] == "bytes":
        return format_bytes(value)
    if quantity["unit"] == "pct":
        return f"{value:+.2f} %"
    return str(value)


EXACT_BYTES = 1024
"""Below this an error is shown in bytes beside the percentage, which rounds it to zero."""


def _error(quantity: dict) -> str:
    if quantity["error_pct"] is not None:
        error = f"{quantity['error_pct']:+.3f} %"
        return error + (f" ({quantity['error']:+d} B)" if abs(quantity["error"]) < EXACT_BYTES else "")
    if quantity["error"] is not None:
        return f"{quantity['error']:+}" if quantity["unit"] == "batches" else format_bytes(quantity["error"])
    return quantity["note"] if quantity["note"] == kit.NOT_ON_CPU else "-"


def _verdict(quantity: dict) -> str:
    return {True: "yes", False: "NO", None: "-"}[quantity["within_target"]]


def table(document: dict) -> str:
    """One line per quantity (a case without quantities: one line with its status)."""
    header = f"{'case':<16} {'status':<8} {'quantity':<22} {'predicted':>11} {'measured':>11} {'error':>18} {'target':<22} ok"
    lines = [header, "-" * len(header)]
    for case in document["cases"]:
        label = f"{case['id']:<16} {case['status']:<8}"
        if not case["quantities"] or case["status"] != "ok":
            lines.append(f"{label} {case['reason'] or ''}")
            label = " " * len(label)
        for quantity in case["quantities"]:
            lines.append(f"{label} {quantity['name']:<22} {_value(quantity, 'predicted'):>11} {_value(quantity, 'measured'):>11} "
                         f"{_error(quantity):>18} {quantity['target'] or '':<22} {_verdict(quantity)}")
            label = " " * len(label)
    summary = document["summary"]
    lines.append(f"{summary['num_within_target']} of {summary['num_compared']} compared quantities within target; "
                 f"cases: {summary['num_ok']} ok, {summary['num_failed'] + summary['num_oom']} failed, "
                 f"{summary['num_killed']} killed, {summary['num_skipped']} skipped; wall {document['wall_s']:.0f} s "
                 f"of a {document['budget_s']:.0f} s budget")
    return "\n".join(lines)


def read_documents(folder: Path) -> list[tuple[Path, dict]]:
    """The validation JSON files in ``folder``, oldest first (by their ``created``)."""
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        document = json.loads(path.read_text())
        if document.get("schema_version") and "cases" in document:
            found.append((path, document))
    return sorted(found, key=lambda item: item[1]["created"])


def _machine_line(document: dict) -> str:
    machine = document["machine"]
    if document["kind"] == "gpu":
        where = f"{machine['gpu_name']}, driver {machine['driver_version']}, CUDA {machine['cuda_version']}"
    else:
        load = machine["load_average_start"][0]
        where = f"{machine['cpu_count']} CPU cores (load average {load:.1f} at the start)"
    commit = (machine.get("dpplan_commit") or "unknown")[:10]
    return f"{where}, torch {machine['torch_version']}, dpplan {commit}"


def _case_cells(case: dict) -> list[str]:
    by_name = {q["name"]: q for q in case["quantities"]}
    cells = []
    for name in ("allocated", "reserved", "nvml"):
        quantity = by_name.get(name)
        cells.append("" if quantity is None else _error(quantity) + (" ✗" if quantity["within_target"] is False else ""))
    others = []
    for q in case["quantities"]:
        if q["name"] in ("allocated", "reserved", "nvml", "allocator_slack", "outside_allocator") or q["measured"] is None:
            continue
        text = f"{q['name']} {_value(q, 'measured')}"
        text += f" (predicted {_value(q, 'predicted')})" if q["predicted"] is not None else f" (target {q['target']})"
        others.append(text + (" ✗" if q["within_target"] is False else ""))
    return cells + ["; ".join(others) or (case["reason"] or "" if case["status"] != "ok" else "")]


def readme_block(folder: Path, root: Path) -> str:
    """The README's GPU validation block, from the newest GPU result and the newest dry run in ``folder``."""
    documents = read_documents(folder)
    gpu = [(p, d) for p, d in documents if d["kind"] == "gpu"]
    dry = [(p, d) for p, d in documents if d["kind"] == "cpu-dry-run"]
    lines = [README_START]
    if not gpu:
        lines.append("**No GPU result yet**: no GPU has run the kit, so the GPU-only terms above are still modeled, "
                     "not measured.")
    for path, document in gpu[-1:] + dry[-1:]:
        summary = document["summary"]
        where = path.resolve().relative_to(root.resolve())
        label = "GPU run" if document["kind"] == "gpu" else "CPU dry run (checks the kit, not the GPU terms)"
        lines += ["", f"{label}: [{where}]({where}), {_machine_line(document)}; "
                  f"{summary['num_cases']} cases in {document['wall_s']:.0f} s (budget {document['budget_s']:.0f} s): "
                  f"{summary['num_ok']} ok, {summary['num_skipped']} skipped, {summary['num_killed']} killed, "
                  f"{summary['num_failed'] + summary['num_oom']} failed; "
                  f"**{summary['num_within_target']} of {summary['num_compared']} compared quantities within target**.",
                  "", "| case | status | allocated | reserved | NVML | other |", "|---|---|---:|---:|---:|---|"]
        for case in document["cases"]:
            lines.append(f"| {case['id']} | {case['status']} | " + " | ".join(_case_cells(case)) + " |")
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(readme: Path, folder: Path) -> None:
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + readme_block(folder, readme.parent) + text[end:])


def readme_section(readme: Path) -> str:
    text = readme.read_text()
    return text[text.index(README_START):text.index(README_END) + len(README_END)]
