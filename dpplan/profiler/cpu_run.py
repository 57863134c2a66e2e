"""Launch a short real CPU training run (gloo) through torch's elastic launcher and collect
each rank's measured memory. Used by the accuracy benchmark and the CPU accuracy tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from dpplan.profiler.worker import RunConfig


class RunFailed(RuntimeError):
    pass


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
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env
        )
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
