"""Where a profile runs, decided once: the GPUs found (asked in a child process), else CPU
ranks with gloo; the memory per rank tested against; and why a strategy cannot run there."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from dpplan.config import ProfileConfig
from dpplan.errors import RunFailed, UsageError
from dpplan.planner.hardware import DEFAULT_GPU, GPU_CATALOG, match_gpu
from dpplan.planner.strategies.registry import Wrapper, strategy_info

DEFAULT_CPU_RANKS = 2
DETECT_TIMEOUT_S = 120


@dataclass(frozen=True, kw_only=True)
class Target:
    """What the runs execute on, decided once."""

    device: str
    """cuda or cpu."""
    gpus: int
    """Total ranks."""
    gpu: str | None
    """Catalog key of the estimates (cuda)."""
    description: str
    notices: tuple[str, ...]
    total_bytes: int | None = None
    """Memory of the GPU found (cuda)."""


_DETECT_GPUS = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "p = torch.cuda.get_device_properties(0) if n else None\n"
    "print(json.dumps({'count': n, 'name': p and p.name, 'total_bytes': p and p.total_memory}))\n"
)


def detect_gpus() -> dict[str, Any]:
    """GPUs torch sees here: {count, name, total_bytes} (of device 0).

    Asked in a child process: this process must never initialise CUDA, or its context would
    sit on GPU 0 beside rank 0 for the whole profile and inflate that rank's NVML reading."""
    import torch

    if not torch.backends.cuda.is_built():
        return {"count": 0, "name": None, "total_bytes": None}
    completed = subprocess.run(
        [sys.executable, "-c", _DETECT_GPUS], capture_output=True, text=True, timeout=DETECT_TIMEOUT_S, check=False
    )
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunFailed(f"could not ask torch for GPUs: {last}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def resolve_target(config: ProfileConfig) -> Target:
    """GPUs when there are any (and not --device cpu), else CPU ranks, said in one line."""
    gpus_found: dict[str, Any] = (
        detect_gpus() if config.device != "cpu" else {"count": 0, "name": None, "total_bytes": None})
    num_visible = gpus_found["count"]
    if config.device == "cuda" and not num_visible:
        raise UsageError("--device cuda: no GPU is visible to torch here")
    if config.device == "cpu" or not num_visible:
        # a tp or ep group, or a pipeline, at least
        gpus = config.gpus or max(DEFAULT_CPU_RANKS, config.run.tp * config.run.ep * config.run.pp) * config.nodes
        notices = [] if config.device == "cpu" else [
            f"no GPU found: running each strategy on {gpus} CPU process{'es' if gpus > 1 else ''} with gloo "
            "(tensor bytes and host RSS, no GPU memory)"
        ]
        return Target(device="cpu", gpus=gpus, gpu=None, description=f"{gpus} CPU ranks (gloo)", notices=tuple(notices))
    gpus = config.gpus or num_visible * config.nodes
    per_node = gpus // config.nodes
    if per_node > num_visible:
        raise UsageError(f"--gpus {gpus} over {config.nodes} node(s) needs {per_node} GPUs per node; {num_visible} visible here")
    name = gpus_found["name"]
    notices = []
    key = config.gpu.lower() if config.gpu else match_gpu(name, gpus_found["total_bytes"])
    if key is None:
        key = DEFAULT_GPU
        notices.append(f"{name} is not in dpplan's GPU catalog: estimates use {key} (choose with --gpu)")
    description = f"{gpus} x {name} ({config.nodes} node{'s' if config.nodes > 1 else ''}, nccl)"
    return Target(device="cuda", gpus=gpus, gpu=key, description=description, notices=tuple(notices),
                  total_bytes=gpus_found["total_bytes"])


def capacity_override(config: ProfileConfig, target: Target) -> int | None:
    """The memory per rank to plan and test against when it is not the estimate's default:
    --gpu-memory, or on a GPU a catalog card (--gpu) smaller than the one found."""
    if config.gpu_memory_bytes is not None:
        if target.device == "cuda" and target.total_bytes and config.gpu_memory_bytes > target.total_bytes:
            raise UsageError(
                f"--gpu-memory {config.gpu_memory_bytes} bytes is more than the GPU here has ({target.total_bytes} bytes)")
        return config.gpu_memory_bytes
    if target.device == "cuda" and config.gpu and target.total_bytes:
        card = GPU_CATALOG[config.gpu.lower()].memory_bytes
        return card if card < target.total_bytes else None
    return None


def memory_limit_bytes(config: ProfileConfig, target: Target) -> int | None:
    """The cap each cuda rank puts on its allocator; None on cpu (nothing caps host memory)."""
    capacity = capacity_override(config, target)
    if target.device != "cuda" or capacity is None or not target.total_bytes or capacity >= target.total_bytes:
        return None
    return capacity


def capacity_source(config: ProfileConfig, target: Target) -> str:
    capped = " (each rank capped with torch.cuda.set_per_process_memory_fraction)"
    if config.gpu_memory_bytes is not None:
        if target.device == "cpu":
            return "--gpu-memory: a planning capacity only on CPU ranks, nothing caps the processes"
        return "--gpu-memory" + (capped if memory_limit_bytes(config, target) else "")
    if capacity_override(config, target) is not None:
        return f"--gpu {target.gpu}" + capped
    return f"{target.gpu} memory" if target.device == "cuda" else "host RAM per rank"


def skip_reason(strategy: str, gpus: int, tp: int = 1, pp: int = 1) -> str | None:
    """Why ``strategy`` cannot be profiled on ``gpus`` ranks at tensor-parallel degree ``tp``
    and ``pp`` pipeline ranks, or None. A single-device strategy has no data parallelism: its
    one replica spans ``tp x pp`` ranks."""
    info = strategy_info(strategy)
    if info.wrapper is Wrapper.DEEPSPEED and importlib.util.find_spec("deepspeed") is None:
        return f"{strategy} is a DeepSpeed stage and DeepSpeed is not installed: estimate only"
    if info.not_runnable:
        return info.not_runnable
    if info.single_device and gpus != tp * pp:
        if tp * pp == 1:
            return f"{strategy} runs on one GPU: profile it with --gpus 1"
        what = "--tp" if pp == 1 else "--pp" if tp == 1 else "--tp x --pp"
        return f"{strategy} has no data parallelism: profile it with --gpus {tp * pp} (= {what})"
    return None
