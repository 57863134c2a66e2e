"""Launch one short real run through torch's elastic launcher, and never leave a process behind.

Every run is one fresh ``python -m torch.distributed.run`` job (one process per GPU, or per
CPU rank): a crash, an OOM or a hang stays inside that job, and the next run starts clean
(in-process recovery after an OOM is fragile: profilers.md §3). The launcher runs in a session
of its own; on a timeout, on Ctrl-C or on any error here its whole process tree is stopped.

Per-rank stdout/stderr go to files through torchrun's ``--log-dir`` and ``--redirects 3``:
``<log_dir>/<rdzv run id>/attempt_0/<local rank>/stderr.log``
(torch/distributed/elastic/multiprocessing/api.py, ``_make_log_dir``).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dpplan.errors import RunTimedOut, UsageError

WORKER_MODULE = "dpplan.profiler.worker"
KILL_GRACE_S = 10.0
"""How long torchrun gets to stop its ranks after SIGTERM before the tree is killed."""
INTERRUPT_GRACE_S = 3.0
"""The same after Ctrl-C, where the user is waiting."""
STATIC_RDZV_PORT = 29400


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """Where the ranks of one run go: torchrun's own vocabulary."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    """``host:port`` of node 0 (static rendezvous); required when ``nnodes > 1``."""
    log_dir: Path | None = None
    """Per-rank stdout/stderr files go here (``--redirects 3``); None: to the launcher's output."""

    def __post_init__(self):
        if self.nproc_per_node < 1:
            raise UsageError(f"nproc_per_node must be >= 1 (got {self.nproc_per_node})")
        if self.nnodes < 1:
            raise UsageError(f"nnodes must be >= 1 (got {self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(f"node_rank must be in 0..{self.nnodes - 1} (got {self.node_rank})")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UsageError("a run over several nodes needs rdzv_endpoint (host:port of node 0)")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def torchrun_args(spec: LaunchSpec) -> list[str]:
    """torchrun's flags for ``spec``. One node: ``--standalone`` (a private store on a free port,
    so runs never collide). Several: static rendezvous at node 0's endpoint, the node rank
    given, as with ``torchrun --nnodes N --node-rank R --rdzv-endpoint host:port``
    (torch/distributed/run.py: the static backend reads ``--node-rank``)."""
    args = [f"--nproc-per-node={spec.nproc_per_node}"]
    if spec.nnodes == 1 and not spec.rdzv_endpoint:
        args.insert(0, "--standalone")
    else:
        args += [f"--nnodes={spec.nnodes}", f"--node-rank={spec.node_rank}", f"--rdzv-endpoint={spec.rdzv_endpoint}"]
    if spec.log_dir is not None:
        args += [f"--log-dir={spec.log_dir}", "--redirects=3"]
    return args


def worker_command(spec: LaunchSpec, config_json: str, out_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", *torchrun_args(spec),
        "-m", WORKER_MODULE, "--config-json", config_json, "--out", str(out_dir),
    ]


def user_commands(spec: LaunchSpec, config_json: str, out_dir: str = "OUT") -> dict[str, str]:
    """The same run as command lines a user can launch: torchrun on each node, and SLURM
    (one torchrun per node through srun, as torchtitan's multinode_trainer.slurm does)."""
    worker = ["-m", WORKER_MODULE, "--config-json", config_json, "--out", out_dir]
    endpoint = spec.rdzv_endpoint or f"HEAD_NODE:{STATIC_RDZV_PORT}"
    torchrun = ["torchrun", f"--nproc-per-node={spec.nproc_per_node}"]
    if spec.nnodes == 1 and not spec.rdzv_endpoint:
        torchrun.insert(1, "--standalone")
    else:
        torchrun += [f"--nnodes={spec.nnodes}", f"--node-rank={spec.node_rank}", f"--rdzv-endpoint={endpoint}"]
    # Under srun each task learns its node rank from SLURM; c10d rendezvous needs no node rank.
    srun = [
        "srun", f"--nodes={spec.nnodes}", "--ntasks-per-node=1", f"--gpus-per-node={spec.nproc_per_node}",
        "torchrun", f"--nnodes={spec.nnodes}", f"--nproc-per-node={spec.nproc_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=$SLURM_JOB_ID",
    ]
    return {"torchrun": _shell_line(torchrun + worker), "srun": _shell_line(srun + worker)}


def _shell_line(parts: list[str]) -> str:
    # $SLURM_JOB_ID must stay unquoted so that the shell expands it.
    return " ".join(p if "$SLURM_" in p else shlex.quote(p) for p in parts)


def rank_log(log_dir: Path, local_rank: int, stream: str = "stderr") -> Path | None:
    """The newest ``stdout.log``/``stderr.log`` torchrun wrote for ``local_rank`` under ``log_dir``."""
    found = sorted(Path(log_dir).glob(f"*/attempt_*/{local_rank}/{stream}.log"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def tail(path: Path | None, num_lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(lines[-num_lines:])


def run_process_tree(
    command: list[str], *, env: dict, timeout_s: float, output: Path | None = None,
    on_start: Callable[[int], object] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``command`` in a session of its own and wait. Output goes to ``output`` (a file,
    so that no rank can hold a pipe of ours open) or, without one, is captured.
    ``on_start(pid)`` is called once the process exists (profiler/rank_watch.py watches it).
    Raises RunTimedOut after ``timeout_s``; the tree is killed then, and on any exception."""
    handle = open(output, "w") if output is not None else None
    try:
        process = subprocess.Popen(
            command,
            stdout=handle if handle else subprocess.PIPE,
            stderr=subprocess.STDOUT if handle else subprocess.PIPE,
            text=True, env=env, start_new_session=True,
        )
        try:
            if on_start is not None:
                on_start(process.pid)
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(process)
            raise RunTimedOut(f"the run did not finish within {timeout_s:.0f} s; its processes were stopped") from None
        except KeyboardInterrupt:
            kill_tree(process, grace_s=INTERRUPT_GRACE_S)
            raise
        except BaseException:
            kill_tree(process)
            raise
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    finally:
        if handle is not None:
            handle.close()


def kill_tree(process: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """Stop the launcher and every rank. torchrun starts each rank in a session of its own
    (torch/distributed/elastic/multiprocessing/subprocess_handler), so killing the launcher's
    group alone would orphan them: ask the launcher to stop its ranks (SIGTERM, which it
    forwards), then kill whatever of the tree is still there, by process id."""
    import psutil

    def tree() -> list:
        try:
            return psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    seen = {p.pid: p for p in tree()}
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        pass
    seen.update({p.pid: p for p in tree()})
    for child in seen.values():
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.communicate()
    psutil.wait_procs(list(seen.values()), timeout=grace_s)
