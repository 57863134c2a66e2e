"""profile.json: the ranks of each run merged into one entry, beside its matching estimate.

Schema (``schema_version`` 1; add fields freely, rename or remove only with a new version):
  {schema_version, kind: "profile", tool, created, command, config, device, notices[],
   interrupted, out_dir, runs: [run...]}
  run: {strategy, gpus, nnodes, batch_size, grad_accum, precision, optimizer,
        activation_checkpointing, offload, device, status (ok | oom | failed | skipped),
        error (one line naming the rank, or the reason a run was skipped), failed_rank,
        measured, estimate (the `dpplan estimate` JSON entry), error_pct, errors_pct,
        notes[], dir, commands {torchrun, srun}, duration_s}
  per_rank memory_series: memory over time, see profiler/memory_series.py.
  measured: {peak_allocated_bytes, peak_reserved_bytes, peak_nvml_bytes (null on cpu),
        allocator_cache_bytes, non_pytorch_bytes, peak_rss_bytes (cpu), step_time_s,
        samples_per_s, tokens_per_s, num_ranks_measured, per_rank: [...]}

  recommendations (profiler/recommend.py, after the runs): {capacity_bytes, capacity_source,
        headroom_pct, limit_bytes (capacity x (1 - headroom)), find_batch_size, max_trials,
        strategies: [recommendation...], fastest, notes[]}
  recommendation: {strategy, status (confirmed | predicted | does_not_fit | unknown),
        batch_size (per rank), peak_bytes, peak_source (measured | predicted), samples_per_s (at
        batch_size, when measured there), predicted_batch_size (the calibrated prediction, the
        first trial), calibration {batch_size, measured_bytes, estimated_bytes, ratio, quantity},
        search {num_trials, converged, stop_reason, smallest_rejected, trials: [{batch_size,
        status (ok | over_limit | oom | failed), accepted, peak_bytes, limit_bytes, samples_per_s,
        seconds, error, dir}]} (null without --find-batch-size), offload {needed (none |
        optimizer | optimizer+params | null: none fits), configured, supported, levels:
        [{offload, predicted_peak_bytes (batch 1, calibrated), host_bytes}]}, profiled
        {batch_size, status, fit_bytes, samples_per_s}, notes[]}
  fastest: {strategy, samples_per_s, batch_size, basis, num_candidates} or null.
  The bytes judged against the limit (fit_bytes, peak_bytes, trials' peak_bytes) are NVML used
  on cuda (the whole device, context and NCCL included) and tensor bytes on cpu.

Definitions. peak_allocated_bytes: the largest per-rank peak of allocated tensor bytes over
the timed steps (cuda: torch.cuda.max_memory_allocated; cpu: exact live tensor bytes).
peak_reserved_bytes: the same for torch.cuda.max_memory_reserved; peak_nvml_bytes: the
largest NVML "used" (memory v2) sampled on a rank's device during the timed steps, the whole
device as NVML sees it. The gaps are named per rank: allocator cache = reserved - allocated,
CUDA context + NCCL + other = NVML used - reserved (peaks of different instants, so a gap is
"at most", not exact). step_time_s: the median timed step of the slowest rank (ranks wait for
each other in every collective). samples/s = batch * grad_accum * world size / step time;
tokens/s likewise with profiler/throughput.py's token rule.
error_pct = 100 * (estimate - measured) / measured, of peak_allocated_bytes on cuda (against
the estimate's peak_allocated_bytes) and on cpu (against its peak_bytes, the same thing
there); errors_pct adds reserved and NVML vs the estimate's peak_reserved_bytes and peak_bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_VERSION = 1
PER_RANK_KEYS = (
    "rank", "local_rank", "hostname", "status", "error",
    "peak_allocated_bytes", "peak_reserved_bytes", "peak_nvml_bytes",
    "allocator_cache_bytes", "non_pytorch_bytes",
    "phase_peak_allocated_bytes", "phase_peak_reserved_bytes",
    "num_alloc_retries", "num_ooms",
    "rss_bytes", "peak_rss_bytes",
    "step_time_s", "step_times_s",
    "nvml", "nvml_notice", "nvml_device", "nvml_process_used_bytes", "gpu_name", "gpu_total_bytes",
    "memory_series",
)


def error_pct(estimated: int | None, measured: int | None) -> float | None:
    if estimated is None or not measured:
        return None
    return 100.0 * (estimated - measured) / measured


def rank_detail(result: dict) -> dict:
    detail = {k: result[k] for k in PER_RANK_KEYS if k in result}
    allocated, reserved, nvml = (result.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_nvml_bytes"))
    if allocated is not None and reserved is not None:
        detail["allocator_cache_bytes"] = reserved - allocated
    if reserved is not None and nvml is not None:
        detail["non_pytorch_bytes"] = nvml - reserved
    return detail


def _largest(details: list[dict], key: str) -> int | None:
    values = [d[key] for d in details if d.get(key) is not None]
    return max(values) if values else None


def measured_summary(results: list[dict], *, world_size: int) -> dict:
    """The run's numbers from its ranks' results (all of them status ok)."""
    details = [rank_detail(r) for r in results]
    step_time = max((r["step_time_s"] for r in results), default=None)
    samples = results[0].get("samples_per_step") if results else None
    tokens = results[0].get("tokens_per_step") if results else None
    return {
        "peak_allocated_bytes": _largest(details, "peak_allocated_bytes"),
        "peak_reserved_bytes": _largest(details, "peak_reserved_bytes"),
        "peak_nvml_bytes": _largest(details, "peak_nvml_bytes"),
        "allocator_cache_bytes": _largest(details, "allocator_cache_bytes"),
        "non_pytorch_bytes": _largest(details, "non_pytorch_bytes"),
        "peak_rss_bytes": _largest(details, "peak_rss_bytes"),
        "step_time_s": step_time,
        "samples_per_s": samples * world_size / step_time if samples and step_time else None,
        "tokens_per_s": tokens * world_size / step_time if tokens and step_time else None,
        "num_ranks_measured": len(results),
        "per_rank": details,
    }


def outcome(
    *,
    strategy: str,
    batch_size: int,
    gpus: int,
    device: str,
    expected_ranks: list[int],
    results: dict[int, dict],
    returncode: int | None,
    timed_out: str | None,
    stderr_tail: dict[int, str],
    launcher_tail: str,
) -> tuple[str, str | None, int | None]:
    """(status, one-line error, rank) of a run from what its ranks wrote and how the launcher ended.

    The root cause is the earliest failure: when one rank dies, its peers fail afterwards
    in a collective (gloo: "Connection closed by peer"), or are stopped by torchrun."""
    failures = [r for r in results.values() if r.get("status") != "ok"]
    where = f"{gpus} GPU{'s' if gpus > 1 else ''}" if device == "cuda" else f"{gpus} CPU rank{'s' if gpus > 1 else ''}"
    oom = [r for r in failures if r.get("status") == "oom"]
    if oom:
        first = min(oom, key=lambda r: r.get("failed_at", 0))
        return "oom", f"batch {batch_size} does not fit with {strategy} on {where} (rank {first['rank']}: {first['error']})", first["rank"]
    if failures:
        first = min(failures, key=lambda r: r.get("failed_at", 0))
        return "failed", f"rank {first['rank']} failed: {first['error']}", first["rank"]
    missing = [r for r in expected_ranks if r not in results]
    if timed_out:
        return "failed", timed_out + (f" (no result from rank {missing[0]})" if missing else ""), missing[0] if missing else None
    if missing:
        for rank in missing:
            lines = [line for line in stderr_tail.get(rank, "").splitlines() if line.strip()]
            if lines:
                return "failed", f"rank {rank} exited without a result: {lines[-1].strip()}", rank
        last = [line for line in launcher_tail.splitlines() if line.strip()]
        detail = f": {last[-1].strip()}" if last else ""
        return "failed", f"rank {missing[0]} wrote no result (launcher exit {returncode}){detail}", missing[0]
    if returncode:
        return "failed", f"the launcher exited with {returncode} although every rank finished", None
    return "ok", None, None


def write_profile(document: dict, out_dir: Path) -> Path:
    """Write ``out_dir/profile.json`` atomically (a reader never sees half a file)."""
    path = out_dir / "profile.json"
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(document, indent=2) + "\n")
    temp.replace(path)
    return path
