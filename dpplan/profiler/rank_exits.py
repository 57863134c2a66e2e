"""How torchrun says its ranks ended, and what a rank killed by a signal died of.

A rank that raises writes its own result (profiler/worker.py); a rank the kernel kills writes
nothing, and its stderr log ends wherever it was, often at the line torch's profiler prints when
the CPU memory recorder starts (``USDT:... SyncActivityProfilerHandler.cpp:52] profiler_start``,
kineto's log), which is not a cause. torchrun knows how each rank ended: when a rank fails it
stops the others and raises ``ChildFailedError``, whose message lists every failed rank as
``rank : R (local_rank: L)`` / ``exitcode : -9 (pid: P) (SIGKILL)`` (a negative exit code is the
signal) and names the first one it observed as the root cause
(torch/distributed/elastic/multiprocessing/errors/__init__.py, ``_FAILURE_FORMAT_TEMPLATE``).
That message ends the launcher's log; ``rank_exits`` reads it back.

A rank killed by SIGKILL is out of memory when the kernel recorded an OOM kill during the run
(profiler/host_memory.py's counters) or the machine's available memory fell below
``LOW_MEMORY_FRACTION`` (a user-space OOM killer acts there); otherwise the kill is named as it
is, with "likely out of memory", since nothing else on a training host sends SIGKILL unasked.
"""

from __future__ import annotations

import re
import signal
from typing import NamedTuple

from dpplan.profiler.host_memory import gigabytes
from dpplan.profiler.rank_watch import MemoryEvidence

LOW_MEMORY_FRACTION = 0.05
"""earlyoom's default: it sends SIGKILL when available memory falls below 5% (``-m 10``
SIGTERM at 10%, SIGKILL at half of it: earlyoom README, "Configuration")."""
_FAILURE = re.compile(
    r"^\s*rank\s*:\s*(?P<rank>\d+) \(local_rank: (?P<local_rank>\d+)\)\s*\n"
    r"\s*exitcode\s*:\s*(?P<exitcode>-?\d+) \(pid: (?P<pid>\d+)\)", re.MULTILINE)
_ROOT_CAUSE = "Root Cause (first observed failure):"
_KINETO_LOG = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.\w+:\d+\]")
"""A line of kineto's own log (``USDT:2026-12-07 22:50:17 6442:6442 SyncActivityProfilerHandler.cpp:52]
profiler_start``): torch's profiler starting, never the cause of a failure."""


class RankExit(NamedTuple):
    """One failed rank as torchrun reported it."""

    rank: int
    local_rank: int
    exitcode: int
    """Negative: killed by that signal."""
    pid: int
    root_cause: bool
    """torchrun's first observed failure."""

    @property
    def signal_name(self) -> str | None:
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"


def rank_exits(launcher_log: str) -> dict[int, RankExit]:
    """The failed ranks in torchrun's ChildFailedError message (empty: none, or no message)."""
    root_at = launcher_log.rfind(_ROOT_CAUSE)
    exits = {}
    for match in _FAILURE.finditer(launcher_log):
        rank = int(match["rank"])
        exits[rank] = RankExit(rank=rank, local_rank=int(match["local_rank"]), exitcode=int(match["exitcode"]),
                               pid=int(match["pid"]), root_cause=0 <= root_at < match.start())
    return exits


def killed_root_cause(exits: dict[int, RankExit], results: dict[int, dict]) -> RankExit | None:
    """The rank whose death by a signal set the run off, if one did: torchrun's root cause,
    killed, with no result of its own. A rank torchrun stopped afterwards (SIGTERM, then
    SIGKILL after its grace period) is never the root cause."""
    for exit in exits.values():
        if exit.root_cause and exit.exitcode < 0 and exit.rank not in results and exit.exitcode != -signal.SIGTERM:
            return exit
    return None


def out_of_memory(evidence: MemoryEvidence | None) -> str | None:
    """Why the run is known to have run out of host memory, or None."""
    if evidence is None:
        return None
    if evidence.oom_killed:
        return "kernel"
    lowest, total = evidence.lowest_available_bytes, evidence.total_bytes
    if lowest is not None and total and lowest < LOW_MEMORY_FRACTION * total:
        return "low"
    return None


def kill_cause(exit: RankExit, evidence: MemoryEvidence | None) -> tuple[bool, str]:
    """(out of memory, one line) for a rank killed by a signal."""
    rss = evidence.last_rss_bytes.get(exit.pid) if evidence else None
    at = f" at ~{gigabytes(rss)} RSS" if rss else ""
    name = exit.signal_name
    if name != "SIGKILL":
        return False, f"rank {exit.rank} was killed by {name}{at}"
    why = out_of_memory(evidence)
    if why == "kernel":
        return True, f"rank {exit.rank} was killed by the kernel's OOM killer (SIGKILL){at}"
    if why == "low":
        assert evidence is not None and evidence.lowest_available_bytes is not None
        return True, (f"rank {exit.rank} was killed by SIGKILL{at} while the machine ran out of memory "
                      f"({gigabytes(evidence.lowest_available_bytes)} available at the lowest reading)")
    recorded = "the kernel's OOM counters are not readable here" if (
        evidence is None or evidence.oom_killed is None) else "but the kernel recorded no OOM kill"
    return False, f"rank {exit.rank} was killed by SIGKILL{at} (likely out of memory, {recorded})"


def last_meaningful_line(log_tail: str) -> str | None:
    """The last line of a log that says something: not kineto's own log, not a rule of ``=`` or
    ``-`` (torchrun's summary ends with one); None when there is none."""
    lines = [line.strip() for line in log_tail.splitlines()]
    lines = [line for line in lines if line.strip("=-") and not _KINETO_LOG.match(line)]
    return lines[-1] if lines else None
