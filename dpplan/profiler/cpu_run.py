"""Launch a short real CPU training run (gloo) through torch's elastic launcher and collect
each rank's measured memory. Used by the accuracy benchmark and the CPU accuracy tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from dpplan.profiler.worker import RunConfig


class RunFailed(RuntimeError):
    pass


def _run_in_own_group(command: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """Run the launcher in a process group of its own, and kill that whole group (launcher and
    every rank) on a timeout, on Ctrl-C or on any error here: no rank is ever left behind."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise RunFailed(f"the run did not finish within {timeout_s:.0f} s; its processes were stopped") from None
    except BaseException:
        _kill_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the launcher and every rank. torchrun starts each rank in a session of its own
    (torch/distributed/elastic/multiprocessing/subprocess_handler), so killing the launcher's
    group alone would orphan them: ask the launcher to stop its ranks (SIGTERM), then kill
    whatever of the process tree is still there."""
    import psutil

    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


def run_cpu(config: RunConfig, num_ranks: int, *, timeout_s: float = 900, out_dir: Path | None = None) -> list[dict]:
    """Run ``config`` on ``num_ranks`` CPU processes; returns the rank results, rank order."""
    temp = None
    if out_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="dpplan-cpu-run-")
        out_dir = Path(temp.name)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={num_ranks}",
        "-m", "dpplan.profiler.worker",
        "--config-json", json.dumps(asdict(config)),
        "--out", str(out_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        completed = _run_in_own_group(command, env, timeout_s)
        results = []
        for rank in range(num_ranks):
            path = out_dir / f"rank{rank}.json"
            if not path.exists():
                tail = "\n".join((completed.stderr or "").strip().splitlines()[-15:])
                raise RunFailed(f"rank {rank} wrote no result (exit {completed.returncode}):\n{tail}")
            results.append(json.loads(path.read_text()))
        return results
    finally:
        if temp is not None:
            temp.cleanup()
