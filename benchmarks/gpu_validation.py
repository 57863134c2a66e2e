"""GPU validation kit (issue 17): the terms only a GPU has, measured against dpplan's estimate.

    python benchmarks/gpu_validation.py --out docs/validation/            # one GPU, at most --budget-s (480 s)
    python benchmarks/gpu_validation.py --dry-run --out docs/validation/  # the same on CPU ranks (~5 min, 2 cores)
    python benchmarks/gpu_validation.py --dry-run --only single-fp32,sampler --out /tmp/v --budget-s 120
    python benchmarks/gpu_validation.py --list                            # the cases, in the order they run
    python benchmarks/gpu_validation.py --update-readme                   # README's block from docs/validation/*.json

Each case (benchmarks/gpu_validation_cases.py) is one command in a fresh process tree, run in
priority order: the CUDA context and cuBLAS workspace alone, then `dpplan profile` runs of the
bundled GPT and zoo models (single, FSDP2 and DeepSpeed ZeRO-1/2/3 on one rank; fp32 and
bf16-mixed; checkpointing; two micro-batches), the sampler's overhead, and the OOM boundary
(allocator capped with --gpu-memory, --find-batch-size). Every measured peak is compared with
the estimate of the same `dpplan profile` (peak_allocated_bytes / peak_reserved_bytes /
peak_bytes against torch.cuda.max_memory_allocated / max_memory_reserved / NVML used).

The budget: a case starts only if the time left covers its expected duration (scaled by how
the cases so far compared with theirs), else it is recorded "skipped: budget"; a case still
running at the deadline is stopped with its whole process tree (dpplan/profiler/launch.py's
kill_tree, as `dpplan profile` stops its ranks). The JSON is rewritten after every case, so a
stopped or interrupted run keeps what it measured.

Output: OUT/gpu-<gpu>-<date>.json (dry run: OUT/cpu-dry-run-<date>.json) and a table; each
run's own files (profile.json, logs) under --runs-dir. This process never initialises CUDA:
its context would sit on the GPU beside every case's (profiler/profile.py's rule).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_validation_cases as kit  # noqa: E402
import gpu_validation_report as report  # noqa: E402
from gpu_runtime_probe import driver_version  # noqa: E402  (NVML's, which makes no CUDA context)

from dpplan import __version__  # noqa: E402
from dpplan.errors import INTERRUPTED_EXIT, USAGE_EXIT, DpplanError, RunTimedOut, UsageError  # noqa: E402
from dpplan.planner.hardware import DEFAULT_GPU, GPU_CATALOG, match_gpu  # noqa: E402
from dpplan.profiler.launch import KILL_GRACE_S, run_process_tree  # noqa: E402

SCHEMA_VERSION = 1
DEFAULT_BUDGET_S = 480.0
DRY_RUN_BUDGET_S = 300.0
"""Issue 17: at most 8 minutes on one GPU; the dry run at most 5 minutes."""
DEFAULT_RUNS_DIR = ROOT / "dpplan-runs"
MIN_PACE, MAX_PACE = 0.5, 5.0
"""Bounds of the factor expected durations are scaled by (measured / expected so far)."""
STOP_MARGIN_S = KILL_GRACE_S + 5
"""Cases are stopped this long before the deadline: stopping a tree takes up to launch.py's
grace, and the JSON is written after it, so the whole run ends within its budget."""


@dataclass(kw_only=True)
class Budget:
    """The deadline and how fast cases run compared with their expected durations."""

    budget_s: float
    start_s: float = field(default_factory=time.perf_counter)
    expected_run_s: float = 0.0
    actual_run_s: float = 0.0

    @property
    def deadline_s(self) -> float:
        return self.start_s + self.budget_s

    def remaining_s(self) -> float:
        """Seconds a case may still run (the stop margin kept back)."""
        return self.deadline_s - STOP_MARGIN_S - time.perf_counter()

    def pace(self) -> float:
        if not self.expected_run_s:
            return 1.0
        return min(MAX_PACE, max(MIN_PACE, self.actual_run_s / self.expected_run_s))

    def record(self, expected_s: float, actual_s: float) -> None:
        self.expected_run_s += expected_s
        self.actual_run_s += actual_s


def _shown(path: Path) -> str:
    """A path as the JSON keeps it: relative to the repository root when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(dry_run: bool) -> dict:
    """What ran the cases. On a GPU the device is asked in a child process (profiler/target.py detect_gpus)."""
    import torch

    status = _git("status", "--porcelain")
    info = {
        "device": "cpu" if dry_run else "cuda",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "deepspeed_version": _version("deepspeed"),
        "dpplan_version": __version__,
        "dpplan_commit": _git("rev-parse", "HEAD"),
        "dpplan_tree_dirty": None if status is None else bool(status),
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_start": list(os.getloadavg()),
        "gpu_name": None, "gpu_total_bytes": None, "gpu_catalog_key": None, "driver_version": None,
    }
    if dry_run:
        from dpplan.planner.cpu_kernels import cpu_description

        info["cpu"] = cpu_description()
        return info
    from dpplan.profiler.target import detect_gpus

    found = detect_gpus()
    if not found["count"]:
        return info
    key = match_gpu(found["name"], found["total_bytes"])
    info.update(gpu_name=found["name"], gpu_total_bytes=found["total_bytes"], gpu_count=found["count"],
                gpu_catalog_key=key or DEFAULT_GPU, gpu_in_catalog=key is not None, driver_version=driver_version())
    return info


def output_path(out_dir: Path, info: dict, now: datetime) -> Path:
    if info["device"] == "cpu":
        stem = f"cpu-dry-run-{now:%Y%m%d}"
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", (info["gpu_catalog_key"] if info.get("gpu_in_catalog") else info["gpu_name"]).lower())
        stem = f"gpu-{slug.strip('-')}-{now:%Y%m%d}"
    path, n = out_dir / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = out_dir / f"{stem}-{n}.json"
    return path


def _last_json_line(log: Path) -> dict | None:
    """The last line of a case's output that is a JSON object (the probe's and sampler's report)."""
    if not log.exists():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else "no output"


def run_command(argv: list[str], *, log: Path, budget: Budget) -> tuple[int | None, bool]:
    """(returncode, killed): the command in a session of its own, killed with its whole tree at the deadline."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
           "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        completed = run_process_tree([sys.executable, *argv], env=env, timeout_s=max(1.0, budget.remaining_s()),
                                     output=log)
    except RunTimedOut:
        return None, True
    return completed.returncode, False


def _children_cpu_s() -> float:
    """User + system CPU seconds of every finished descendant (each reaped by its parent)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def case_record(case: kit.Case, *, dry_run: bool, expected_s: float, status: str, reason: str | None = None,
                command: str | None = None, quantities: list[kit.Quantity] | None = None, **details) -> dict:
    return {"id": case.id, "kind": case.kind, "title": case.title, "settings": case.settings(dry_run), "command": command,
            "status": status, "reason": reason, "expected_s": round(expected_s, 2),
            "quantities": [q.to_json() for q in quantities or ()], **details}


def previous_durations(out_dir: Path, kind: str) -> dict[str, float]:
    """Each case's wall time in the newest earlier result of this kind in ``out_dir`` (cases
    that ran to the end only): a measured expectation, where the case list has only guesses."""
    documents = [d for _, d in report.read_documents(out_dir) if d["kind"] == kind] if out_dir.is_dir() else []
    if not documents:
        return {}
    return {c["id"]: c["duration_s"] for c in documents[-1]["cases"]
            if c["status"] in ("ok", "failed", "oom") and c.get("duration_s")}


def skip_reason(case: kit.Case, dry_run: bool, budget: Budget, expected_s: float) -> str | None:
    if dry_run and case.kind == "runtime":
        return f"{kit.NOT_ON_CPU}: the CUDA context and cuBLAS workspace exist only on a GPU"
    missing = [name for name in case.needs if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    expected = expected_s * budget.pace()
    if budget.remaining_s() < expected:
        return f"budget: {budget.remaining_s():.0f} s left, the case takes about {expected:.0f} s"
    return None


def run_case(case: kit.Case, *, dry_run: bool, runs_dir: Path, budget: Budget, info: dict, expected_s: float) -> dict:
    """Run one case and read its result into quantities."""
    case_dir = runs_dir / case.id
    argv = case.argv(dry_run=dry_run, out_dir=Path(_shown(case_dir / "profile")))
    log = case_dir / "output.log"
    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    returncode, killed = run_command(argv, log=log, budget=budget)
    duration = time.perf_counter() - start
    if not killed:
        budget.record(expected_s, duration)
    # CPU seconds of the case's whole process tree beside its wall time: on a shared machine
    # the gap is the load (the load average when it started is recorded too).
    details: dict[str, Any] = {
        "command": kit.command_line(argv), "returncode": returncode, "duration_s": round(duration, 2),
        "cpu_s": round(_children_cpu_s() - cpu_start, 2), "load_average_at_start": round(load, 2), "dir": _shown(case_dir),
    }
    quantities: list[kit.Quantity] = []
    extra: dict = {}
    status, reason = "ok", None
    if case.kind in ("profile", "oom_boundary"):
        path = case_dir / "profile" / "profile.json"
        document = json.loads(path.read_text()) if path.exists() else {}
        runs = document.get("runs") or []
        run = runs[0] if runs else None
        if run is not None and run["status"] == "ok":
            quantities = kit.profile_quantities(run, info["device"])
            measured = run.get("measured") or {}
            extra = {"step_time_s": measured.get("step_time_s"), "samples_per_s": measured.get("samples_per_s")}
            if case.kind == "oom_boundary" and not killed:
                quantities += kit.oom_quantities(document)
        elif run is not None:
            status, reason = run["status"], run.get("error")
    else:
        output = _last_json_line(log)
        if output is not None and case.kind == "runtime":
            spec = GPU_CATALOG[info["gpu_catalog_key"] or DEFAULT_GPU]
            quantities, extra = kit.runtime_quantities(output, spec), {"probe": output}
        elif output is not None:
            quantities, extra = kit.sampler_quantities(output), {"sampler": output}
    if killed:
        status, reason = "killed", (f"budget: still running {STOP_MARGIN_S:.0f} s before the {budget.budget_s:.0f} s "
                                    "deadline; its processes were stopped")
    elif returncode != 0 and status == "ok":
        status, reason = "failed", _last_line(log)
    elif status == "ok" and not quantities:
        status, reason = "failed", f"no result was written ({_last_line(log)})"
    return case_record(case, dry_run=dry_run, expected_s=expected_s, status=status, reason=reason, quantities=quantities,
                       **details, **extra)


def write_document(document: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    temporary.replace(path)  # never a half-written file


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def validate(selected: list[kit.Case], *, dry_run: bool, budget_s: float, out_dir: Path, runs_dir: Path,
             command: str, on_case=None) -> tuple[dict, Path, bool]:
    """Run ``selected`` within ``budget_s``; returns (document, its path, interrupted). The cases
    run from the repository root, which their commands' paths are relative to."""
    budget = Budget(budget_s=budget_s)
    out_dir, runs_dir = out_dir.resolve(), runs_dir.resolve()
    with contextlib.chdir(ROOT):
        return _validate(selected, dry_run=dry_run, budget=budget, out_dir=out_dir, runs_dir=runs_dir, command=command,
                         on_case=on_case)


def _validate(selected: list[kit.Case], *, dry_run: bool, budget: Budget, out_dir: Path, runs_dir: Path,
              command: str, on_case) -> tuple[dict, Path, bool]:
    now = datetime.now(UTC)
    info = machine_info(dry_run)
    if not dry_run and info["gpu_name"] is None:
        raise UsageError("no CUDA GPU visible to torch here; run with --dry-run to check the kit on CPU ranks")
    path = output_path(out_dir, info, now)
    runs_dir = runs_dir / f"gpu-validation-{now:%Y%m%d-%H%M%S}"
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "kind": "cpu-dry-run" if dry_run else "gpu",
        "created": now.isoformat(timespec="seconds"),
        "command": command, "python": sys.executable, "cwd": "repository root", "budget_s": budget.budget_s,
        "machine": info, "targets": report.TARGETS, "runs_dir": _shown(runs_dir), "cases": [],
    }
    measured_before = previous_durations(out_dir, document["kind"])
    interrupted = False
    previous = {signum: signal.signal(signum, _raise_interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    case = None
    try:
        for index, case in enumerate(selected):
            expected_s = measured_before.get(case.id, case.expected_s(dry_run))
            reason = skip_reason(case, dry_run, budget, expected_s)
            if reason is not None:
                quantities = [kit.not_on_cpu("cuda_context"), kit.not_on_cpu("cublas_workspace")] \
                    if dry_run and case.kind == "runtime" else []
                record = case_record(case, dry_run=dry_run, expected_s=expected_s, status="skipped", reason=reason,
                                     quantities=quantities, command=kit.command_line(
                                         case.argv(dry_run=dry_run, out_dir=Path(_shown(runs_dir / case.id / "profile")))))
            else:
                record = run_case(case, dry_run=dry_run, runs_dir=runs_dir, budget=budget, info=info,
                                  expected_s=expected_s)
            document["cases"].append(record)
            finish(document, budget)
            write_document(document, path)
            if on_case:
                on_case(index, len(selected), record)
        case = None
    except KeyboardInterrupt:
        interrupted = True
        if case is not None and (not document["cases"] or document["cases"][-1]["id"] != case.id):
            document["cases"].append(case_record(
                case, dry_run=dry_run, expected_s=case.expected_s(dry_run), status="killed",
                reason="interrupted (Ctrl-C or SIGTERM); its processes were stopped"))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    document["interrupted"] = interrupted
    finish(document, budget)
    write_document(document, path)
    return document, path, interrupted


def finish(document: dict, budget: Budget) -> None:
    document["wall_s"] = round(time.perf_counter() - budget.start_s, 2)
    document["machine"]["load_average_end"] = list(os.getloadavg())
    document["summary"] = report.summarize(document["cases"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "validation",
                        help="folder of the JSON (default docs/validation)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"stop cleanly after this many seconds (default {DEFAULT_BUDGET_S:g}; dry run {DRY_RUN_BUDGET_S:g})")
    parser.add_argument("--dry-run", action="store_true", help="the same cases on CPU ranks (--device cpu)")
    parser.add_argument("--only", default=None, metavar="IDS", help="comma list of case ids (see --list)")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="where each case's own files go")
    parser.add_argument("--list", action="store_true", help="print the cases and their commands, run nothing")
    parser.add_argument("--update-readme", action="store_true", help="rewrite README.md's GPU validation block from --out")
    args = parser.parse_args(argv)
    if args.update_readme:
        report.update_readme(ROOT / "README.md", args.out)
        print(f"updated {ROOT / 'README.md'} from {args.out}")
        return 0
    selected = kit.cases()
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {c.id for c in selected})
        if unknown:
            print(f"error: --only: unknown case {', '.join(unknown)}; choose from {', '.join(c.id for c in selected)}",
                  file=sys.stderr)
            return USAGE_EXIT
        selected = [c for c in selected if c.id in wanted]
    if args.list:
        for case in selected:
            print(f"{case.id:<16} {kit.command_line(case.argv(dry_run=args.dry_run, out_dir=Path('RUN')))}")
        return 0
    budget_s = args.budget_s if args.budget_s is not None else (DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S)
    if budget_s <= 0:
        print(f"error: --budget-s must be > 0 (got {budget_s:g})", file=sys.stderr)
        return USAGE_EXIT
    command = "python benchmarks/gpu_validation.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def progress(index: int, count: int, record: dict) -> None:
        took = f" {record['duration_s']:.1f} s" if record.get("duration_s") is not None else ""
        why = f" ({record['reason']})" if record.get("reason") else ""
        print(f"[{index + 1}/{count}] {record['id']}: {record['status']}{took}{why}", flush=True)

    try:
        document, path, interrupted = validate(selected, dry_run=args.dry_run, budget_s=budget_s, out_dir=args.out,
                                               runs_dir=args.runs_dir, command=command.strip(), on_case=progress)
    except DpplanError as exc:  # no GPU (usage, 2), or torch could not be asked for one (1)
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    print(report.table(document))
    print(f"wrote {path}")
    return INTERRUPTED_EXIT if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
