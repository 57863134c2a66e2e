"""Launch a short real CPU training run (gloo) through torch's elastic launcher and collect
each rank's measured memory. Used by the accuracy benchmark and the CPU accuracy tests;
``dpplan profile`` launches through profiler/launch.py directly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from dpplan.config import RunConfig
from dpplan.errors import RunFailed
from dpplan.profiler.launch import LaunchSpec, run_process_tree, worker_command

__all__ = ["RunFailed", "run_cpu"]


def run_cpu(config: RunConfig, num_ranks: int, *, timeout_s: float = 900, out_dir: Path | None = None) -> list[dict]:
    """Run ``config`` on ``num_ranks`` CPU processes; returns the rank results, rank order."""
    temp = None
    if out_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="dpplan-cpu-run-")
        out_dir = Path(temp.name)
    command = worker_command(LaunchSpec(nproc_per_node=num_ranks), json.dumps(config.to_json()), out_dir)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        completed = run_process_tree(command, env=env, timeout_s=timeout_s)
        paths = [out_dir / f"rank{rank}.json" for rank in range(num_ranks)]
        results = [json.loads(path.read_text()) if path.exists() else None for path in paths]
        # The rank that failed first says why; the others may have been stopped before writing.
        for rank, result in enumerate(results):
            if result is not None and result.get("status", "ok") != "ok":
                raise RunFailed(f"rank {rank}: {result['status']}: {result.get('error')}")
        for rank, result in enumerate(results):
            if result is None:
                tail = "\n".join((completed.stderr or "").strip().splitlines()[-15:])
                raise RunFailed(f"rank {rank} wrote no result (exit {completed.returncode}):\n{tail}")
        return [result for result in results if result is not None]  # every rank wrote one (checked above)
    finally:
        if temp is not None:
            temp.cleanup()
