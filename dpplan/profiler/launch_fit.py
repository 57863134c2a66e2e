"""Whether a run fits this machine before it is launched, from its estimate.

A run that does not fit is not an error the run reports cleanly everywhere: a CUDA rank raises
OutOfMemoryError (a result, status oom), but CPU ranks (gloo) that outgrow the host's memory
are killed by the kernel's OOM killer, may take other processes with them, and leave no
result. A 7B model profiled on CPU ranks against its own 154 GB estimate did exactly that. So
``dpplan profile`` compares each run's estimate with what the machine has before launching it
(profiler/profile.py refuses, or skips that strategy; ``--force`` launches anyway):

- CPU ranks: every rank on this node holds the estimate's per-rank peak (tensor bytes; the
  estimate's most loaded rank, with offloaded state, which lives in the same memory there)
  plus what a rank holds before its model exists, ``IDLE_RANK_RSS_BYTES``; together against the
  memory available now (profiler/host_memory.py: the host's MemAvailable or the cgroup's
  headroom, the tighter).
- GPUs: the estimate's per-GPU peak (``peak_bytes``: what NVML would show) against the memory
  each rank may use (the GPU's, or the cap of ``--gpu-memory`` / a smaller ``--gpu``); and on
  the host the offloaded state (``host_bytes``, per node) plus ``IDLE_RANK_RSS_BYTES`` per rank.

The sum is a lower bound of what the ranks take (an allocator keeps freed memory, kernels
have workspaces), so a run refused here would not have fitted; one let through may still be
killed, and is then reported as such (profiler/rank_exits.py).
"""

from __future__ import annotations

from dpplan.errors import UsageError
from dpplan.planner.plan import StrategyEstimate
from dpplan.profiler.host_memory import MemoryCeiling, gigabytes

IDLE_RANK_RSS_BYTES = 436_727_808
"""The RSS of a rank of dpplan's worker whose model is nearly empty (tests/fixtures/tiny_mlp.py,
1 MB of tensors), the largest of its ranks measured: 436,727,808 bytes under zero3 (DeepSpeed
0.19.8 imported), 347,164,672 under fsdp2, 340,295,680 under ddp; ``dpplan profile
tests/fixtures/tiny_mlp.py --strategy ddp,fsdp2,zero3 --gpus 2 --device cpu``, profile.json
``per_rank[].peak_rss_bytes``, torch 2.13.0+cpu, 2-core AMD EPYC. Python, torch, gloo and the
exact-memory recorder: on GPUs a rank also holds the CUDA libraries' host memory, not measured
here (no GPU), so there it is a lower bound."""


def host_bytes_needed(estimate: StrategyEstimate, *, device: str, ranks_on_node: int) -> int:
    """What the ranks of this node need of the host's memory (see the module docstring)."""
    if device == "cpu":
        return ranks_on_node * (estimate.peak_bytes + IDLE_RANK_RSS_BYTES)
    return (estimate.host_bytes or 0) + ranks_on_node * IDLE_RANK_RSS_BYTES


def _available(host: MemoryCeiling) -> str:
    where = "" if host.source == "host" else f" under its cgroup limit ({host.source})"
    return f"this machine has {gigabytes(host.available_bytes)} available{where}"


def misfit(estimate: StrategyEstimate, *, device: str, where: str, ranks_on_node: int, host: MemoryCeiling,
           gpu_bytes: int | None = None, gpu_source: str = "the GPU has") -> str | None:
    """Why the run of ``estimate`` on ``where`` (``4 CPU ranks``, ``8 GPUs``) cannot fit here, in
    one line naming the numbers; None when it fits. ``gpu_bytes``: memory each cuda rank may
    use, ``gpu_source`` what that is (``the GPU has``, ``each rank is capped to``)."""
    subject = estimate.strategy if estimate.offload == "none" else f"{estimate.strategy} with {estimate.offload} offload"
    if device == "cuda" and gpu_bytes is not None and estimate.peak_bytes > gpu_bytes:
        return f"{subject} on {where} needs ~{gigabytes(estimate.peak_bytes)} per GPU, {gpu_source} {gigabytes(gpu_bytes)}"
    needed = host_bytes_needed(estimate, device=device, ranks_on_node=ranks_on_node)
    if needed <= host.available_bytes:
        return None
    memory = "" if device == "cpu" else " of host memory"
    return f"{subject} on {where} needs ~{gigabytes(needed)}{memory}, {_available(host)}"


def decide(misfits: dict[str, str], *, num_launchable: int, force: bool) -> tuple[dict[str, str], tuple[str, ...]]:
    """What to do with the runs that do not fit (``misfits``: strategy -> ``misfit`` line):
    (the skip reason of each run not to launch, the notices of runs launched anyway).

    Without ``force``: when no run of the profile fits, the profile is refused, before anything
    is launched (UsageError, exit 2); when some fit, the others are skipped with the reason and
    the rest run. With ``force`` every run is launched and each misfit said in a notice."""
    if not misfits:
        return {}, ()
    if force:
        return {}, tuple(f"--force: launched anyway: {line}" for line in misfits.values())
    if len(misfits) >= num_launchable:
        lines = list(misfits.values())
        what = lines[0] if len(lines) == 1 else "no strategy fits this machine: " + "; ".join(lines)
        raise UsageError(f"{what}; pass --force to run anyway")
    return {strategy: f"not run: {line}; pass --force to run it" for strategy, line in misfits.items()}, ()
