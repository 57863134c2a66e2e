"""Planning speed: a Llama-style 70B model, every strategy, 8 to 1024 GPUs, as one CLI command.

Targets (issue #2): <= 5 s wall and <= 1 GiB peak RSS on a 2-core machine, for the whole
process (Python start, torch import, trace, every strategy and GPU count, JSON written).

Measured with this script on the shared 2-core development machine, torch 2.13 CPU build,
``--runs 7`` at the final commit of stop 8 (medians; min-max), each run alternated with a bare
``python -c "import torch"`` (the machine's speed drifts: compare with the bare import):
    bf16-mixed  4.7 s wall (3.8-5.6 s), bare torch import process 2.7 s, 292 MiB peak RSS
    bf16-mixed  5.0 s wall (4.4-5.7 s), bare torch import process 2.9 s, 292 MiB peak RSS
    fp32        3.9 s wall (3.5-4.7 s), bare torch import process 2.4 s, 289 MiB peak RSS
An hour earlier, the machine slower: bf16-mixed 5.8 s (bare import 3.7 s), fp32 4.6 s (3.0 s).
Before (stop 7, 3 runs): bf16-mixed 15.6 s, fp32 9.4 s. The ``trace_s`` printed is tracing
CPU seconds summed over both processes (building the model, and torch's sympy import, are
outside it).

    python benchmarks/speed.py                       # bf16-mixed, 3 runs, median
    python benchmarks/speed.py --runs 5
    python benchmarks/speed.py --precision fp32 --runs 5

Equivalent by hand: /usr/bin/time -v dpplan estimate benchmarks/models/llama_70b.py \\
    --strategy all --gpus 8,16,32,64,128,256,512,1024 --gpus-per-node 8 --json /dev/null
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "benchmarks" / "models" / "llama_70b.py"
GPU_COUNTS = "8,16,32,64,128,256,512,1024"


SWEEP = ("--strategy", "all", "--gpus", GPU_COUNTS, "--gpus-per-node", "8")
DATA_PARALLEL = ("--strategy", "fsdp2", "--gpus", "64", "--gpus-per-node", "8")
"""The tensor-parallel comparison (issue 13): fsdp2 on 64 GPUs, then the same with --tp 8."""
TENSOR_PARALLEL = (*DATA_PARALLEL, "--tp", "8")


def one_run(precision: str, batch_size: int, flags: tuple[str, ...] = SWEEP) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        command = [
            sys.executable, "-m", "dpplan.cli", "estimate", str(MODEL), *flags, "--precision", precision,
            "--batch-size", str(batch_size), "--json", str(out),
        ]
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child: exec the command with output discarded
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.execv(sys.executable, command)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"dpplan failed: {' '.join(command)}")
        plan = json.loads(out.read_text())
    return {
        "wall_s": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "num_estimates": len(plan["estimates"]),
        "trace_s": plan["model"]["trace_seconds"],
        "num_traced_ops": plan["model"]["num_traced_ops"],
    }


def torch_import_seconds() -> float:
    """Wall seconds of ``python -c "import torch"``: the part of every run no planner can cut."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tensor-parallel", action="store_true",
                        help="time fsdp2 on 64 GPUs with and without --tp 8 (alternated) instead of the sweep")
    args = parser.parse_args(argv)
    _ = resource  # ru_maxrss of the child comes from wait4
    if args.tensor_parallel:
        return compare_tensor_parallel(args)
    runs, imports = [], []
    for _ in range(args.runs):  # alternated, so that both see the same machine
        runs.append(one_run(args.precision, args.batch_size))
        imports.append(torch_import_seconds())
    summary = {
        "command": f"dpplan estimate {MODEL.relative_to(ROOT)} --strategy all --gpus {GPU_COUNTS} "
        f"--gpus-per-node 8 --precision {args.precision} --batch-size {args.batch_size} --json PATH",
        "runs": args.runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "min_wall_s": min(r["wall_s"] for r in runs),
        "max_wall_s": max(r["wall_s"] for r in runs),
        "median_import_torch_s": statistics.median(imports),
        "median_trace_s": statistics.median(r["trace_s"] for r in runs),
        "max_peak_rss_mib": max(r["peak_rss_bytes"] for r in runs) / 2**20,
        "estimates_per_run": runs[0]["num_estimates"],
        "traced_ops": runs[0]["num_traced_ops"],
    }
    print(json.dumps(summary, indent=1))
    return 0


def compare_tensor_parallel(args) -> int:
    """Target (issue 13): the tp 8 plan within 1.5x the wall time of the data-parallel one."""
    plain, tp = [], []
    for _ in range(args.runs):  # alternated, so that both see the same machine
        plain.append(one_run(args.precision, args.batch_size, DATA_PARALLEL)["wall_s"])
        tp.append(one_run(args.precision, args.batch_size, TENSOR_PARALLEL)["wall_s"])
    summary = {
        "command": f"dpplan estimate {MODEL.relative_to(ROOT)} {' '.join(DATA_PARALLEL)} [--tp 8] "
        f"--precision {args.precision} --batch-size {args.batch_size} --json PATH",
        "runs": args.runs,
        "median_wall_s_data_parallel": statistics.median(plain),
        "median_wall_s_tp8": statistics.median(tp),
        "ratio": statistics.median(tp) / statistics.median(plain),
        "target_ratio": 1.5,
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
