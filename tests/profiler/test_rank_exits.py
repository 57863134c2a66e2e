"""A rank killed by a signal: torchrun's report read back, the cause named (OOM killer or not),
and for real: a rank that SIGKILLs itself in a 2-rank CPU run."""

import json
import re

import pytest
from click.testing import CliRunner

from dpplan.cli import main
from dpplan.profiler import profile_results
from dpplan.profiler.rank_exits import kill_cause, killed_root_cause, last_meaningful_line, rank_exits
from dpplan.profiler.rank_watch import MemoryEvidence

GB = 10**9

# The end of launcher.log of a real run (torch 2.13: ChildFailedError's message) whose rank 0
# was SIGKILLed in forward; rank 1 then failed in gloo ("Connection reset by peer").
TORCHRUN_REPORT = """\
W1207 22:50:17.770000 6433 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 6443 closing \
signal SIGTERM
E1207 22:50:17.888000 6433 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) \
local_rank: 0 (pid: 6442) of binary: /work/main/.venv/bin/python
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
dpplan.profiler.worker FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-07_22:50:17
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 6443)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_22:50:17
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 6442)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 6442
============================================================
"""
KINETO_LINE = "USDT:2026-12-07 22:50:17 6442:6442 SyncActivityProfilerHandler.cpp:52] profiler_start"
PEER_RESULT = {"rank": 1, "status": "failed", "failed_at": 1.0,
               "error": "model.py: RuntimeError: [pair.cc:537] Read error [127.0.0.1]:29414: Connection reset by peer."}


def test_torchruns_report_names_each_failed_rank_and_the_root_cause():
    exits = rank_exits(TORCHRUN_REPORT)
    assert sorted(exits) == [0, 1]
    assert exits[0].exitcode == -9 and exits[0].pid == 6442 and exits[0].signal_name == "SIGKILL" and exits[0].root_cause
    assert exits[1].exitcode == 1 and exits[1].signal_name is None and not exits[1].root_cause
    assert killed_root_cause(exits, {1: PEER_RESULT}) == exits[0]
    assert rank_exits("W1207 ... Sending process 1 closing signal SIGTERM\n") == {}


def test_a_kill_is_out_of_memory_only_with_evidence():
    exit = rank_exits(TORCHRUN_REPORT)[0]
    seen = dict(last_rss_bytes={6442: 38_540_000_000}, total_bytes=64 * GB)
    kernel = MemoryEvidence(oom_killed=True, lowest_available_bytes=20 * GB, **seen)
    assert kill_cause(exit, kernel) == (True, "rank 0 was killed by the kernel's OOM killer (SIGKILL) at ~38.5 GB RSS")
    low = MemoryEvidence(oom_killed=False, lowest_available_bytes=int(0.2 * GB), **seen)
    assert kill_cause(exit, low) == (True, "rank 0 was killed by SIGKILL at ~38.5 GB RSS while the machine ran out "
                                           "of memory (0.2 GB available at the lowest reading)")
    plenty = MemoryEvidence(oom_killed=False, lowest_available_bytes=20 * GB, **seen)
    assert kill_cause(exit, plenty) == (False, "rank 0 was killed by SIGKILL at ~38.5 GB RSS (likely out of memory, "
                                               "but the kernel recorded no OOM kill)")
    unreadable = MemoryEvidence(oom_killed=None)
    assert kill_cause(exit, unreadable) == (False, "rank 0 was killed by SIGKILL (likely out of memory, the kernel's "
                                                   "OOM counters are not readable here)")
    segfault = exit._replace(exitcode=-11)
    assert kill_cause(segfault, kernel) == (False, "rank 0 was killed by SIGSEGV at ~38.5 GB RSS")


def test_the_killed_rank_is_the_root_cause_not_its_peer_nor_kinetos_log():
    exits = rank_exits(TORCHRUN_REPORT)
    arguments = dict(strategy="fsdp2", batch_size=1, gpus=2, device="cpu", expected_ranks=[0, 1],
                     results={1: PEER_RESULT}, returncode=1, timed_out=None, stderr_tail={0: KINETO_LINE},
                     launcher_tail=TORCHRUN_REPORT, exits=exits)
    evidence = MemoryEvidence(oom_killed=True, last_rss_bytes={6442: 38_540_000_000})
    status, error, rank = profile_results.outcome(**arguments, evidence=evidence)
    assert (status, rank) == ("oom", 0)
    assert error == ("batch 1 does not fit with fsdp2 on 2 CPU ranks (rank 0 was killed by the kernel's OOM killer "
                     "(SIGKILL) at ~38.5 GB RSS)")
    # Without the report (an older launcher log): kineto's line is not taken for the cause.
    assert last_meaningful_line(f"{KINETO_LINE}\n") is None
    status, error, rank = profile_results.outcome(**{**arguments, "results": {}, "exits": {}},
                                                  evidence=MemoryEvidence(oom_killed=False))
    assert (status, rank) == ("failed", 0) and "USDT" not in error and "profiler_start" not in error
    assert error == "rank 0 wrote no result (launcher exit 1): traceback : Signal 9 (SIGKILL) received by PID 6442"


KILLS_ITSELF_ON_RANK_0 = '''
import os
import signal
import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    def forward(self, x):
        if os.environ.get("RANK") == "0":  # set only in a real run under torchrun
            os.kill(os.getpid(), signal.SIGKILL)
        for layer in self.layers:
            x = layer(x)
        return x


def build_model():
    return Model()


def example_batch(batch_size):
    return torch.randn(batch_size, 16)
'''


def test_a_rank_killed_by_sigkill_is_named_with_its_memory(write_model, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["profile", write_model(KILLS_ITSELF_ON_RANK_0), "--device", "cpu", "--gpus", "2",
                                       "--strategy", "ddp", "--precision", "fp32", "--steps", "1", "--out", str(out)],
                                catch_exceptions=False)
    (run,) = json.loads((out / "profile.json").read_text())["runs"]
    if run["status"] == "oom":
        pytest.skip("the kernel recorded an OOM kill elsewhere during this run: the kill cannot be told apart")
    assert result.exit_code == 1, result.output
    assert (run["status"], run["failed_rank"]) == ("failed", 0)
    # the watch read rank 0's RSS before it died: an idle rank's, a few hundred MB (launch_fit.IDLE_RANK_RSS_BYTES)
    match = re.fullmatch(r"rank 0 was killed by SIGKILL at ~(\d+\.\d) GB RSS \(likely out of memory, (but the kernel "
                         r"recorded no OOM kill|the kernel's OOM counters are not readable here)\)", run["error"])
    assert match, run["error"]
    assert 0.1 <= float(match[1]) <= 2.0
    assert "Connection reset" not in run["error"] and "USDT" not in result.output
