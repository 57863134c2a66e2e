"""The host's memory as the kernel reports it: cgroup files (v1 and v2 layouts written out as
the kernel names them), this machine's own readings, and the OOM-kill counters."""

import sys

import psutil
import pytest

from dpplan.profiler import host_memory
from dpplan.profiler.host_memory import CgroupMemory, OomKillCounts, available_memory, own_cgroup

GB = 10**9


def _cgroup_v2(root, path, **files):
    directory = root / path.lstrip("/")
    directory.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)
    return directory


def test_v2_and_v1_cgroups_are_found_from_proc_self_cgroup(tmp_path):
    v2 = tmp_path / "v2"
    directory = _cgroup_v2(v2, "/user.slice/job-1", memory_max="max\n")
    assert own_cgroup("0::/user.slice/job-1\n", root=v2) == CgroupMemory(directory, 2)
    # Inside a container the path is the host's but the mount shows only this cgroup: its root.
    assert own_cgroup("0::/kubepods/pod-9\n", root=v2) == CgroupMemory(v2, 2)
    v1 = tmp_path / "v1"
    (v1 / "memory" / "process_api" / "abc").mkdir(parents=True)
    lines = "5:devices:/process_api/abc\n4:memory:/process_api/abc\n0::/\n"
    assert own_cgroup(lines, root=v1) == CgroupMemory(v1 / "memory" / "process_api" / "abc", 1)
    assert own_cgroup("0::/x\n", root=tmp_path / "none") is None  # no memory controller mounted


def test_a_cgroup_limit_below_the_hosts_memory_is_the_ceiling(tmp_path):
    limit = psutil.virtual_memory().total // 4
    directory = _cgroup_v2(tmp_path, "/job", memory_max=f"{limit}\n", memory_current=f"{limit // 2 + 3 * 4096}\n",
                           memory_stat="anon 123\ninactive_file 12288\nactive_file 4096\n",
                           memory_events="low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\n")
    cgroup = CgroupMemory(directory, 2)
    # the working set leaves out the inactive file cache, which the kernel reclaims before it OOM-kills
    assert cgroup.working_set_bytes() == limit // 2
    ceiling = available_memory(cgroup)
    assert (ceiling.available_bytes, ceiling.total_bytes, ceiling.source) == (limit - limit // 2, limit, "memory.max")
    assert cgroup.oom_kills() == 1
    # "max" (v2) and a limit at or above the host's RAM (v1's 2^63 - 4096) do not bind
    (directory / "memory.max").write_text("max\n")
    assert available_memory(cgroup).source == "host"
    (directory / "memory.max").write_text(f"{2**63 - 4096}\n")
    assert available_memory(cgroup).source == "host"


def test_this_machines_readings():
    ceiling = available_memory()
    host = psutil.virtual_memory()
    assert 0 < ceiling.available_bytes <= ceiling.total_bytes <= host.total
    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel's OOM-kill counters are Linux's")
    counts = host_memory.oom_kill_counts()
    assert counts.host is not None and counts.host >= 0  # /proc/vmstat oom_kill, Linux 4.13+


def test_oom_kill_counters_rising():
    before = OomKillCounts(host=3, cgroup=0)
    assert OomKillCounts(host=3, cgroup=0).rose_since(before) is False
    assert OomKillCounts(host=4, cgroup=0).rose_since(before) is True
    assert OomKillCounts(host=3, cgroup=1).rose_since(before) is True
    assert OomKillCounts(host=None, cgroup=None).rose_since(OomKillCounts(None, None)) is None


def test_gigabytes_are_decimal():
    assert host_memory.gigabytes(154_200_000_000) == "154.2 GB"
