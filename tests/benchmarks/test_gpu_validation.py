"""The GPU validation kit (benchmarks/gpu_validation.py): its dry run on CPU ranks writes the
schema with real measured numbers, the budget guard stops cleanly and leaves no process, the
README's block is the rendering of the committed JSON, and on a GPU the runtime probe measures."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_validation.py"


@pytest.fixture(scope="module")
def kit():
    """benchmarks/gpu_validation.py and its two helper modules, imported as the script imports them."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return (importlib.import_module("gpu_validation"), importlib.import_module("gpu_validation_cases"),
            importlib.import_module("gpu_validation_report"))


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, check=False)


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in process.info["cmdline"] or ()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _only_json(folder: Path) -> dict:
    files = sorted(folder.glob("*.json"))
    assert len(files) == 1, files
    assert files[0].name.startswith("cpu-dry-run-")
    return json.loads(files[0].read_text())


def test_a_reduced_dry_run_measures_for_real_and_writes_the_schema(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = _run("--dry-run", "--only", "runtime,single-fp32", "--out", str(out), "--runs-dir", str(runs),
                "--budget-s", "200")
    assert done.returncode == 0, done.stderr[-2000:]
    document = _only_json(out)
    assert document["schema_version"] == 1 and document["kind"] == "cpu-dry-run"
    assert {"torch_version", "cuda_version", "driver_version", "gpu_name", "dpplan_commit", "load_average_start",
            "load_average_end"} <= set(document["machine"])
    runtime, single = document["cases"]
    assert runtime["status"] == "skipped" and runtime["reason"].startswith("n/a on CPU")
    assert [q["note"] for q in runtime["quantities"]] == ["n/a on CPU", "n/a on CPU"]

    assert single["status"] == "ok", single["reason"]
    assert single["command"].startswith("python -m dpplan.cli profile --gpus 1 --strategy single --precision fp32")
    assert "--device cpu" in single["command"] and single["duration_s"] > 0
    quantities = {q["name"]: q for q in single["quantities"]}
    allocated = quantities["allocated"]
    assert allocated["predicted"] > 100 * 2**20 and allocated["measured"] > 100 * 2**20  # the GPT's 36 M parameters
    assert allocated["error"] == allocated["predicted"] - allocated["measured"]
    assert allocated["error_pct"] == pytest.approx(100 * allocated["error"] / allocated["measured"])
    assert allocated["within_target"] is (abs(allocated["error_pct"]) <= 1.0)
    assert all(quantities[name]["note"] == "n/a on CPU" for name in ("reserved", "nvml", "allocator_slack"))
    # the run's own profile.json, from the command recorded
    profile = json.loads((ROOT / single["dir"] / "profile" / "profile.json").read_text())
    assert profile["runs"][0]["measured"]["peak_allocated_bytes"] == allocated["measured"]
    assert document["summary"]["num_ok"] == 1 and document["summary"]["num_compared"] == 1
    assert "single-fp32" in done.stdout and "allocated" in done.stdout


def test_a_tiny_budget_skips_every_case_and_still_writes_the_json(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = _run("--dry-run", "--only", "single-fp32,sampler,oom-boundary", "--out", str(out), "--runs-dir", str(runs),
                "--budget-s", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    document = _only_json(out)
    assert [c["status"] for c in document["cases"]] == ["skipped"] * 3
    assert all(c["reason"].startswith("budget:") for c in document["cases"])
    assert document["summary"]["num_skipped_budget"] == 3
    assert not _processes_mentioning(str(runs))


def test_a_case_running_at_the_deadline_is_stopped_with_its_whole_tree(kit, tmp_path):
    validation, cases, _ = kit
    # The OOM boundary's real `dpplan profile` (a run and its trial jobs, ~45 s of CPU), told it
    # takes 0.1 s so that the guard starts it, under a budget it cannot finish in: the deadline
    # must stop the profile, torchrun and its rank.
    case = replace(next(c for c in cases.cases() if c.id == "oom-boundary"), expected_cpu_s=0.1)
    validation.machine_info(dry_run=True)  # torch imported here first: the budget is for the case
    runs = tmp_path / "runs"
    budget_s = validation.STOP_MARGIN_S + 8  # about 8 s to run, then the margin to stop the tree in
    start = time.perf_counter()
    document, path, interrupted = validation.validate(
        [case], dry_run=True, budget_s=budget_s, out_dir=tmp_path / "out", runs_dir=runs, command="test")
    took = time.perf_counter() - start
    assert not interrupted and path.exists()
    (record,) = json.loads(path.read_text())["cases"]
    assert record["status"] == "killed" and record["reason"].startswith("budget:"), record
    assert took < budget_s, f"the run ended {took - budget_s:.1f} s after its budget"
    assert document["wall_s"] <= budget_s
    assert not _processes_mentioning(str(runs)), "a process of the stopped case was left behind"


def test_errors_are_one_line_and_exit_2(tmp_path):
    unknown = _run("--only", "nonsense", timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.strip().startswith("error: --only: unknown case nonsense")
    import torch

    if torch.cuda.is_available():
        pytest.skip("the no-GPU error needs a machine without a GPU")
    no_gpu = _run("--out", str(tmp_path), "--budget-s", "5", timeout=120)
    assert no_gpu.returncode == 2, no_gpu.stderr
    assert no_gpu.stderr.strip().splitlines() == [
        "error: no CUDA GPU visible to torch here; run with --dry-run to check the kit on CPU ranks"]
    assert not list(tmp_path.glob("*.json"))


def test_targets_are_judged_as_issue_17_states_them(kit):
    _, cases, _ = kit
    gib = 2**30
    run = {"estimate": {"peak_allocated_bytes": 1000 * 2**20, "peak_reserved_bytes": 1100 * 2**20, "peak_bytes": 2 * gib},
           "measured": {"peak_allocated_bytes": 1020 * 2**20, "peak_reserved_bytes": 1100 * 2**20,
                        "peak_nvml_bytes": 2 * gib + 400 * 2**20, "allocator_cache_bytes": 80 * 2**20,
                        "non_pytorch_bytes": gib + 324 * 2**20}}
    by_name = {q.name: q for q in cases.profile_quantities(run, "cuda")}
    assert by_name["allocated"].error_pct == pytest.approx(-100 * 20 / 1020)  # -1.96 %: outside 1 %
    assert by_name["allocated"].within_target is False
    assert by_name["reserved"].error == 0 and by_name["reserved"].within_target is True
    assert by_name["nvml"].error_pct == pytest.approx(-100 * 400 / 2448)  # -16 %, but within 0.5 GiB
    assert by_name["nvml"].within_target is True
    assert by_name["allocator_slack"].predicted == 100 * 2**20 and by_name["allocator_slack"].within_target is None
    assert by_name["outside_allocator"].predicted == 2 * gib - 1100 * 2**20

    def boundary(predicted, found, converged):
        document = {"runs": [{"estimate": {"max_batch_size": predicted}}],
                    "recommendations": {"strategies": [{"batch_size": found, "predicted_batch_size": found,
                                                        "search": {"converged": converged, "num_trials": 2,
                                                                   "stop_reason": "", "trials": []}}]}}
        (quantity,) = cases.oom_quantities(document)
        return quantity

    assert boundary(14, 15, True).within_target is True and boundary(14, 15, True).error == -1
    assert boundary(14, 16, True).within_target is False
    assert boundary(14, 15, False).within_target is None  # an unconverged search proves no boundary


def test_the_readme_block_is_the_rendering_of_the_committed_results(kit):
    _, _, report = kit
    folder = ROOT / "docs" / "validation"
    documents = report.read_documents(folder)
    assert any(d["kind"] == "cpu-dry-run" for _, d in documents), "docs/validation has no committed dry run"
    section = report.readme_section(ROOT / "README.md")
    assert section == report.readme_block(folder, ROOT), (
        "README.md's GPU validation block is stale: python benchmarks/gpu_validation.py --update-readme")
    if not any(d["kind"] == "gpu" for _, d in documents):
        assert "No GPU result yet" in section


def test_the_runtime_probe_measures_the_context_and_cublas_workspace():
    import torch

    probe = [sys.executable, str(BENCHMARKS / "gpu_runtime_probe.py")]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)
    if not torch.cuda.is_available():
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        pytest.skip("the CUDA context and cuBLAS workspace exist only on a GPU")
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["cublas_workspace_bytes"] > 0
    if measured["nvml_used_before_bytes"] is not None:
        assert measured["cuda_context_bytes"] > 0
