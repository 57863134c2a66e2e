"""What host memory this machine can still give a run, and whether the kernel OOM-killed anything.

Readings only; profiler/launch_fit.py decides whether a run fits before it is launched, and
profiler/rank_exits.py says why a rank died.

Available memory is the smaller of two ceilings:
- the host's: psutil's ``virtual_memory().available``, the kernel's MemAvailable estimate
  (/proc/meminfo: free memory plus the page cache and slab it can reclaim without swapping);
- this process's memory cgroup, when it has a limit: the limit less the cgroup's working set,
  the whole subtree's usage less its inactive file cache (cAdvisor's and the kubelet's
  ``working_set_bytes``), walked up through every ancestor that sets a limit. cgroup v2 names
  them ``memory.max`` / ``memory.current`` / ``memory.stat`` ``inactive_file``; v1
  ``memory.limit_in_bytes`` / ``memory.usage_in_bytes`` / ``memory.stat`` ``total_inactive_file``
  (kernel Documentation/admin-guide/cgroup-v2.rst and cgroup-v1/memory.rst). A limit at or
  above the host's RAM cannot bind (v1 writes "unlimited" as 2^63 - 4096) and is ignored.

The ranks of a run inherit this process's cgroup (torchrun and its children are plain forks),
so the cgroup's ceiling is theirs.

OOM kills are counted by the kernel twice, in ``__oom_kill_process`` (mm/oom_kill.c): the
host-wide ``oom_kill`` of /proc/vmstat (Linux 4.13+), and the victim's cgroup ``oom_kill``
(v2 ``memory.events``, v1 ``memory.oom_control``). Either rising during a run is a kernel
record that something was OOM-killed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_VMSTAT = Path("/proc/vmstat")
GB = 10**9
"""Messages say host memory in GB (10^9 bytes; ``free --si`` shows the same numbers)."""


def gigabytes(num_bytes: int) -> str:
    return f"{num_bytes / GB:.1f} GB"


@dataclass(frozen=True, kw_only=True)
class MemoryCeiling:
    """How much more memory this machine gives, and out of what."""

    available_bytes: int
    total_bytes: int
    """What ``available_bytes`` is a part of: the host's RAM, or the binding cgroup's limit."""
    source: str
    """``host`` or the cgroup file that binds (``memory.max``, ``memory.limit_in_bytes``)."""


class CgroupMemory(NamedTuple):
    """One cgroup directory's memory files, as this kernel's cgroup version names them."""

    directory: Path
    version: int

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"

    def limit_bytes(self) -> int | None:
        text = _read(self.directory / self.limit_file)
        if text is None or text == "max":
            return None
        return int(text)

    def working_set_bytes(self) -> int | None:
        usage = _read(self.directory / ("memory.current" if self.version == 2 else "memory.usage_in_bytes"))
        if usage is None:
            return None
        stat = parse_counters(_read(self.directory / "memory.stat") or "")
        inactive = stat.get("inactive_file" if self.version == 2 else "total_inactive_file", 0)
        return max(0, int(usage) - inactive)

    def oom_kills(self) -> int | None:
        text = _read(self.directory / ("memory.events" if self.version == 2 else "memory.oom_control"))
        return None if text is None else parse_counters(text).get("oom_kill")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def parse_counters(text: str) -> dict[str, int]:
    """``name value`` lines (memory.stat, memory.events, memory.oom_control, /proc/vmstat)."""
    counters = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counters[parts[0]] = int(parts[1])
    return counters


def own_cgroup(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> CgroupMemory | None:
    """This process's memory cgroup directory (None: no memory controller mounted).

    /proc/self/cgroup holds ``0::/path`` under cgroup v2 and ``N:memory:/path`` (the memory
    controller's hierarchy) under v1. Inside a container the path may be the host's while the
    mount shows only the container's subtree: then the mount's root is this cgroup."""
    text = proc_cgroup if proc_cgroup is not None else _read(PROC_CGROUP)
    if text is None:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return _existing(root / "memory", path, version=1)
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (root / "cgroup.controllers").exists():
            return _existing(root, path, version=2)
    return None


def _existing(mount: Path, path: str, *, version: int) -> CgroupMemory | None:
    for directory in (mount / path.lstrip("/"), mount):
        if directory.is_dir():
            return CgroupMemory(directory, version)
    return None


def _with_ancestors(cgroup: CgroupMemory, mount: Path) -> list[CgroupMemory]:
    chain, directory = [], cgroup.directory
    while True:
        chain.append(CgroupMemory(directory, cgroup.version))
        if directory == mount or directory.parent == directory:
            return chain
        directory = directory.parent


def available_memory(cgroup: CgroupMemory | None = None) -> MemoryCeiling:
    """The memory this machine can still give, the tighter of the host's and the cgroups'."""
    import psutil

    memory = psutil.virtual_memory()
    ceiling = MemoryCeiling(available_bytes=memory.available, total_bytes=memory.total, source="host")
    cgroup = cgroup if cgroup is not None else own_cgroup()
    if cgroup is None:
        return ceiling
    mount = CGROUP_ROOT / "memory" if cgroup.version == 1 else CGROUP_ROOT
    for level in _with_ancestors(cgroup, mount):
        limit = level.limit_bytes()
        used = level.working_set_bytes()
        if limit is None or used is None or limit >= memory.total:
            continue
        headroom = max(0, limit - used)
        if headroom < ceiling.available_bytes:
            ceiling = MemoryCeiling(available_bytes=headroom, total_bytes=limit, source=level.limit_file)
    return ceiling


class OomKillCounts(NamedTuple):
    """The kernel's OOM-kill counters; None where this machine does not expose one."""

    host: int | None
    cgroup: int | None

    def rose_since(self, before: OomKillCounts) -> bool | None:
        """Whether either counter rose since ``before``; None when neither can be read."""
        pairs = [(b, a) for b, a in zip(before, self) if a is not None and b is not None]
        if not pairs:
            return None
        return any(after > earlier for earlier, after in pairs)


def oom_kill_counts(cgroup: CgroupMemory | None = None) -> OomKillCounts:
    if not sys.platform.startswith("linux"):
        return OomKillCounts(None, None)
    host = parse_counters(_read(PROC_VMSTAT) or "").get("oom_kill")
    cgroup = cgroup if cgroup is not None else own_cgroup()
    return OomKillCounts(host, cgroup.oom_kills() if cgroup is not None else None)
