"""One profiled run: the ranks' results merged into a measured summary, beside its estimate.

A run's JSON (one entry of profile.json's ``runs``, see profile_document.py) is
``RunResult.to_json()``:
  {strategy, gpus, nodes, batch_size, grad_accum, precision, optimizer,
   activation_checkpointing, offload, device, status (ok | oom | failed | skipped),
   error (one line naming the rank, or the reason a run was skipped), failed_rank,
   measured, estimate (the `dpplan estimate` JSON entry), error_pct, errors_pct,
   notes[], dir, stderr_tail (a failed rank's, when known), commands {torchrun, srun},
   duration_s}; the last three only for runs that were launched.
  per_rank memory_series: memory over time, see profiler/memory_series.py.
  measured: {peak_allocated_bytes, peak_reserved_bytes, peak_nvml_bytes (null on cpu),
        allocator_cache_bytes, non_pytorch_bytes, peak_rss_bytes (cpu), step_time_s,
        step_time_spread_s, samples_per_s, tokens_per_s, num_ranks_measured, per_rank: [...]}; a launched run
        that did not finish has only {per_rank} (the ranks that wrote a result).

Definitions. peak_allocated_bytes: the largest per-rank peak of allocated tensor bytes over
the timed steps (cuda: torch.cuda.max_memory_allocated; cpu: exact live tensor bytes).
peak_reserved_bytes: the same for torch.cuda.max_memory_reserved; peak_nvml_bytes: the
largest NVML "used" (memory v2) sampled on a rank's device during the timed steps, the whole
device as NVML sees it. The gaps are named per rank: allocator cache = reserved - allocated,
CUDA context + NCCL + other = NVML used - reserved (peaks of different instants, so a gap is
"at most", not exact). step_time_s: the median timed step of the slowest rank (ranks wait for
each other in every collective); step_time_spread_s: the largest range (slowest - fastest
timed step) of any rank, what two runs' step times must differ by before one is faster
(profiler/recommend.py). samples/s = batch * grad_accum * replicas / step time (replicas:
gpus / (tp x pp), the ranks that train on batches of their own); tokens/s likewise with
training/batch_tokens.py's token rule.
error_pct = 100 * (estimate - measured) / measured, of peak_allocated_bytes on cuda (against
the estimate's peak_allocated_bytes) and on cpu (against its peak_bytes, the same thing
there); errors_pct adds reserved and NVML vs the estimate's peak_reserved_bytes and peak_bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import NamedTuple

from dpplan.planner.plan import StrategyEstimate
from dpplan.profiler.rank_exits import RankExit, kill_cause, killed_root_cause, last_meaningful_line, out_of_memory
from dpplan.profiler.rank_watch import MemoryEvidence

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
    "tensor_parallel",  # tp runs: the rank's coordinates, split/replicated bytes, losses (profiler/tensor_parallel_run.py)
    "expert_parallel",  # ep runs: the rank's coordinates and expert bytes (profiler/expert_parallel_run.py)
    "pipeline",  # pp runs: the rank's coordinates, stages and what they own (profiler/pipeline_run.py)
)


class RunStatus(StrEnum):
    OK = "ok"
    OOM = "oom"
    FAILED = "failed"
    SKIPPED = "skipped"


def estimate_from_json(data: dict | None) -> StrategyEstimate | None:
    """A run's ``estimate`` entry read back (None: the run had none)."""
    return None if data is None else StrategyEstimate.from_json(data)


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What one run was asked to do (the profile's config, on the target found)."""

    strategy: str
    gpus: int
    """Total ranks over all nodes."""
    nodes: int
    batch_size: int
    """Micro-batch per rank."""
    grad_accum: int
    precision: str
    optimizer: str
    activation_checkpointing: bool
    offload: str
    device: str
    """cuda or cpu."""
    tp: int = 1
    """Tensor-parallel degree (the data-parallel strategy runs over gpus / tp ranks)."""
    sequence_parallel: bool = False
    ep: int = 1
    """Expert-parallel degree (of the data-parallel ranks)."""
    pp: int = 1
    """Pipeline ranks (the data-parallel strategy runs over gpus / (tp x pp) ranks)."""
    pp_schedule: str | None = None
    """With pp > 1: torch's schedule (training/pipeline_layout.py); None without a pipeline."""

    @classmethod
    def from_json(cls, data: dict) -> RunSettings:
        """Back from JSON (a profile written before tensor or pipeline parallelism has no tp, pp: 1)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True, kw_only=True)
class Measured:
    """A run's numbers, the largest over its ranks (see Definitions above); None: not
    measured on this device (NVML and reserved on cpu, RSS on cuda)."""

    summarized: bool = True
    """False for a launched run that did not finish: only ``per_rank`` (what the ranks that
    got that far wrote) is known, and only it is written."""
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_nvml_bytes: int | None = None
    allocator_cache_bytes: int | None = None
    non_pytorch_bytes: int | None = None
    peak_rss_bytes: int | None = None
    step_time_s: float | None = None
    step_time_spread_s: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    num_ranks_measured: int | None = None
    per_rank: tuple[dict, ...] = ()
    """Each rank's record as its worker wrote it (PER_RANK_KEYS, the gaps added; worker.py
    owns that schema), memory_series included."""

    def to_json(self) -> dict:
        per_rank = list(self.per_rank)
        if not self.summarized:
            return {"per_rank": per_rank}
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("summarized", "per_rank")}
        return {**data, "per_rank": per_rank}

    @classmethod
    def from_json(cls, data: dict | None) -> Measured | None:
        if data is None:
            return None
        summarized = "num_ranks_measured" in data
        numbers = {f.name: data.get(f.name) for f in fields(cls) if f.name not in ("summarized", "per_rank")}
        return cls(summarized=summarized, per_rank=tuple(data.get("per_rank") or ()), **numbers)


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


def step_time_spread(results: list[dict]) -> float | None:
    """How much a run's timed steps differ: the largest range (slowest - fastest step) of any
    rank's step times; None with fewer than two timed steps (no spread is measured)."""
    ranges = [max(times) - min(times) for r in results if len(times := r.get("step_times_s") or ()) >= 2]
    return max(ranges) if ranges else None


def measured_summary(results: list[dict], *, num_replicas: int) -> Measured:
    """The run's numbers from its ranks' results (all of them status ok). ``num_replicas``: the
    ranks that train on batches of their own (gpus / (tp x pp))."""
    details = [rank_detail(r) for r in results]
    step_time = max((r["step_time_s"] for r in results), default=None)
    samples = results[0].get("samples_per_step") if results else None
    tokens = results[0].get("tokens_per_step") if results else None
    return Measured(
        peak_allocated_bytes=_largest(details, "peak_allocated_bytes"),
        peak_reserved_bytes=_largest(details, "peak_reserved_bytes"),
        peak_nvml_bytes=_largest(details, "peak_nvml_bytes"),
        allocator_cache_bytes=_largest(details, "allocator_cache_bytes"),
        non_pytorch_bytes=_largest(details, "non_pytorch_bytes"),
        peak_rss_bytes=_largest(details, "peak_rss_bytes"),
        step_time_s=step_time,
        step_time_spread_s=step_time_spread(results),
        samples_per_s=samples * num_replicas / step_time if samples and step_time else None,
        tokens_per_s=tokens * num_replicas / step_time if tokens and step_time else None,
        num_ranks_measured=len(results),
        per_rank=tuple(details),
    )


def error_pct(estimated: int | None, measured: int | None) -> float | None:
    if estimated is None or not measured:
        return None
    return 100.0 * (estimated - measured) / measured


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """A finished run's measured peaks against its estimate, in percent (see Definitions)."""

    device: str
    """cuda compares allocated, reserved and NVML used; cpu only the tensor bytes."""
    allocated_pct: float | None
    reserved_pct: float | None = None
    nvml_pct: float | None = None

    def errors_json(self) -> dict:
        """The run's ``errors_pct``."""
        if self.device != "cuda":
            return {"allocated": self.allocated_pct}
        return {"allocated": self.allocated_pct, "reserved": self.reserved_pct, "nvml": self.nvml_pct}

    def to_json(self) -> dict:
        return {"error_pct": self.allocated_pct, "errors_pct": self.errors_json()}

    @classmethod
    def from_json(cls, run: dict) -> Comparison | None:
        errors = run.get("errors_pct")
        if errors is None:
            return None
        return cls(device=run["device"], allocated_pct=errors.get("allocated"), reserved_pct=errors.get("reserved"),
                   nvml_pct=errors.get("nvml"))


def compare(measured: Measured | None, estimate: StrategyEstimate | None, device: str) -> Comparison | None:
    """The error of a finished run against its estimate (None without either)."""
    if estimate is None or measured is None or not measured.summarized:
        return None
    # cpu: the estimate's peak_bytes are the tensor bytes, what the run measures as allocated
    allocated = error_pct(estimate.peak_allocated_bytes if device == "cuda" else estimate.peak_bytes,
                          measured.peak_allocated_bytes)
    if device != "cuda":
        return Comparison(device=device, allocated_pct=allocated)
    return Comparison(
        device=device, allocated_pct=allocated,
        reserved_pct=error_pct(estimate.peak_reserved_bytes, measured.peak_reserved_bytes),
        nvml_pct=error_pct(estimate.peak_bytes, measured.peak_nvml_bytes),
    )


class Outcome(NamedTuple):
    status: RunStatus
    error: str | None
    """One line naming the rank (and what it said), None when ok."""
    failed_rank: int | None


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
    exits: dict[int, RankExit] | None = None,
    evidence: MemoryEvidence | None = None,
) -> Outcome:
    """How a run ended, from what its ranks wrote, how torchrun says they exited (``exits``,
    profiler/rank_exits.py) and what the watch saw of memory (``evidence``).

    The root cause is the earliest failure: when one rank dies, its peers fail afterwards
    in a collective (gloo: "Connection closed by peer"), or are stopped by torchrun. A rank
    killed by a signal wrote nothing; torchrun names it, and it comes before its peers'
    failures: a SIGKILL with a kernel OOM record (or while the machine ran out of memory) is an
    out-of-memory."""
    exits = exits or {}
    failures = [r for r in results.values() if r.get("status") != "ok"]
    where = f"{gpus} GPU{'s' if gpus > 1 else ''}" if device == "cuda" else f"{gpus} CPU rank{'s' if gpus > 1 else ''}"
    does_not_fit = f"batch {batch_size} does not fit with {strategy} on {where}"
    oom = [r for r in failures if r.get("status") == "oom"]
    if oom:
        first = min(oom, key=lambda r: r.get("failed_at", 0))
        return Outcome(RunStatus.OOM, f"{does_not_fit} (rank {first['rank']}: {first['error']})", first["rank"])
    killed = None if timed_out else killed_root_cause(exits, results)
    if killed is not None:
        is_oom, cause = kill_cause(killed, evidence)
        if is_oom:
            return Outcome(RunStatus.OOM, f"{does_not_fit} ({cause})", killed.rank)
        return Outcome(RunStatus.FAILED, cause, killed.rank)
    if failures:
        first = min(failures, key=lambda r: r.get("failed_at", 0))
        return Outcome(RunStatus.FAILED, f"rank {first['rank']} failed: {first['error']}", first["rank"])
    missing = [r for r in expected_ranks if r not in results]
    if timed_out:
        return Outcome(RunStatus.FAILED, timed_out + (f" (no result from rank {missing[0]})" if missing else ""),
                       missing[0] if missing else None)
    if missing:
        if out_of_memory(evidence) == "kernel":
            # The launcher itself may have been the victim: no summary of its ranks then.
            return Outcome(RunStatus.OOM, f"{does_not_fit} (no result from rank {missing[0]}; the kernel's OOM "
                                          "killer killed a process of the run)", missing[0])
        for rank in missing:
            line, exit = last_meaningful_line(stderr_tail.get(rank, "")), exits.get(rank)
            if line is None and exit is None:
                continue
            how = "exited" if exit is None else (
                f"was killed by {exit.signal_name}" if exit.signal_name else f"exited with code {exit.exitcode}")
            return Outcome(RunStatus.FAILED, f"rank {rank} {how} without a result" + (f": {line}" if line else ""),
                           rank)
        last = last_meaningful_line(launcher_tail)
        detail = f": {last}" if last else ""
        return Outcome(RunStatus.FAILED, f"rank {missing[0]} wrote no result (launcher exit {returncode}){detail}",
                       missing[0])
    if returncode:
        return Outcome(RunStatus.FAILED, f"the launcher exited with {returncode} although every rank finished", None)
    return Outcome(RunStatus.OK, None, None)


@dataclass(frozen=True, kw_only=True)
class LaunchedRun:
    """One torchrun job as it ended: a profile run or a batch-size trial."""

    outcome: Outcome
    measured: Measured
    stderr_tail: str | None
    """The failed rank's stderr tail, when a rank is to blame."""
    commands: dict[str, str]
    """The same run as ``torchrun`` and ``srun`` command lines (launch.user_commands)."""


def launched_run(*, outcome: Outcome, results: dict[int, dict], expected_ranks: list[int], num_replicas: int,
                 stderr_tail: dict[int, str], commands: dict[str, str]) -> LaunchedRun:
    """What the ranks of a finished job wrote, merged."""
    if outcome.status == RunStatus.OK:
        measured = measured_summary([results[r] for r in expected_ranks], num_replicas=num_replicas)
        tail = None
    else:
        measured = Measured(summarized=False,
                            per_rank=tuple(rank_detail(results[r]) for r in expected_ranks if r in results))
        tail = stderr_tail.get(outcome.failed_rank) if outcome.failed_rank is not None else None
    return LaunchedRun(outcome=outcome, measured=measured, stderr_tail=tail, commands=commands)


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """One strategy's entry of profile.json: what was asked, how it ended, measured and estimated."""

    settings: RunSettings
    status: RunStatus
    error: str | None = None
    failed_rank: int | None = None
    measured: Measured | None = None
    """None for a skipped run."""
    estimate: StrategyEstimate | None = None
    """The matching `dpplan estimate` entry; None when the planner has none for the strategy."""
    comparison: Comparison | None = None
    notes: tuple[str, ...] = ()
    dir: str | None = None
    """The run's folder (rank JSON and logs); None for a skipped run."""
    stderr_tail: str | None = None
    commands: dict[str, str] | None = None
    """None for a skipped run, as are duration_s and stderr_tail: their keys are not written."""
    duration_s: float | None = None
    """Launch to last rank, seconds."""

    def __post_init__(self):
        object.__setattr__(self, "status", RunStatus(self.status))

    @property
    def error_pct(self) -> float | None:
        return self.comparison.allocated_pct if self.comparison else None

    def to_json(self) -> dict:
        data = {
            **asdict(self.settings), "status": str(self.status), "error": self.error, "failed_rank": self.failed_rank,
            "measured": self.measured.to_json() if self.measured else None,
            "estimate": asdict(self.estimate) if self.estimate else None,
            "error_pct": self.error_pct,
            "errors_pct": self.comparison.errors_json() if self.comparison else None,
            "notes": list(self.notes), "dir": self.dir,
        }
        # keys of a launched run only, absent (not null) otherwise, as profile.json has always had them
        for key in ("stderr_tail", "commands", "duration_s"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    @classmethod
    def from_json(cls, data: dict) -> RunResult:
        return cls(
            settings=RunSettings.from_json(data), status=data["status"], error=data.get("error"),
            failed_rank=data.get("failed_rank"), measured=Measured.from_json(data.get("measured")),
            estimate=estimate_from_json(data.get("estimate")), comparison=Comparison.from_json(data),
            notes=tuple(data.get("notes") or ()), dir=data.get("dir"), stderr_tail=data.get("stderr_tail"),
            commands=data.get("commands"), duration_s=data.get("duration_s"),
        )


def skipped_run(settings: RunSettings, *, reason: str, estimate: StrategyEstimate | None,
                notes: tuple[str, ...]) -> RunResult:
    return RunResult(settings=settings, status=RunStatus.SKIPPED, error=reason, estimate=estimate, notes=notes)


def finished_run(settings: RunSettings, launched: LaunchedRun, *, estimate: StrategyEstimate | None,
                 notes: tuple[str, ...], dir: str, duration_s: float) -> RunResult:
    """A launched run beside its estimate, with the error of a finished one."""
    all_notes = list(notes)
    for rank in launched.measured.per_rank:
        notice = rank.get("nvml_notice")
        if notice and notice not in all_notes:
            all_notes.append(notice)  # NVML absent: torch's counters only, said once
    status, error, failed_rank = launched.outcome
    comparison = compare(launched.measured, estimate, settings.device) if status == RunStatus.OK else None
    return RunResult(
        settings=settings, status=status, error=error, failed_rank=failed_rank, measured=launched.measured,
        estimate=estimate, comparison=comparison, notes=tuple(all_notes), dir=dir, stderr_tail=launched.stderr_tail,
        commands=launched.commands, duration_s=duration_s,
    )
