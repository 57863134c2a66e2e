"""Runs that cannot fit this machine are refused or skipped before anything is launched.

The end-to-end tests plan a model sized from this machine's available memory (on the fake
device: nothing is allocated while planning) and, where a run is launched, build a 16-wide
copy of it instead, so that no test allocates what the estimate says."""

import json
import math
import re

import pytest
from click.testing import CliRunner

from dpplan.cli import main
from dpplan.errors import UsageError
from dpplan.profiler import launch_fit
from dpplan.profiler.host_memory import MemoryCeiling, available_memory
from dpplan.profiler.launch_fit import IDLE_RANK_RSS_BYTES, decide, misfit
from tests.records import strategy_estimate

GB = 10**9


def _host(available_bytes, source="host"):
    return MemoryCeiling(available_bytes=available_bytes, total_bytes=64 * GB, source=source)


def test_cpu_ranks_need_their_peak_and_an_idle_rank_each():
    estimate = strategy_estimate(strategy="fsdp2", device="cpu", peak_bytes=38 * GB)
    needed = 4 * (38 * GB + IDLE_RANK_RSS_BYTES)
    assert launch_fit.host_bytes_needed(estimate, device="cpu", ranks_on_node=4) == needed
    line = misfit(estimate, device="cpu", where="4 CPU ranks", ranks_on_node=4, host=_host(21_300_000_000))
    assert line == f"fsdp2 on 4 CPU ranks needs ~{needed / GB:.1f} GB, this machine has 21.3 GB available"
    assert misfit(estimate, device="cpu", where="4 CPU ranks", ranks_on_node=4, host=_host(needed)) is None
    capped = misfit(estimate, device="cpu", where="4 CPU ranks", ranks_on_node=4, host=_host(GB, "memory.max"))
    assert capped.endswith("this machine has 1.0 GB available under its cgroup limit (memory.max)")


def test_gpu_ranks_need_their_peak_per_gpu_and_the_offloaded_state_on_the_host():
    estimate = strategy_estimate(strategy="ddp", device="cuda", peak_bytes=95_300_000_000)
    roomy = _host(500 * GB)
    line = misfit(estimate, device="cuda", where="8 GPUs", ranks_on_node=8, host=roomy, gpu_bytes=85_000_000_000)
    assert line == "ddp on 8 GPUs needs ~95.3 GB per GPU, the GPU has 85.0 GB"
    capped = misfit(estimate, device="cuda", where="8 GPUs", ranks_on_node=8, host=roomy, gpu_bytes=24 * GB,
                    gpu_source="each rank is capped to")
    assert capped.endswith("per GPU, each rank is capped to 24.0 GB")
    offloaded = strategy_estimate(strategy="zero3", device="cuda", offload="optimizer+params", peak_bytes=20 * GB,
                                  host_bytes=600 * GB)
    line = misfit(offloaded, device="cuda", where="8 GPUs", ranks_on_node=8, host=roomy, gpu_bytes=85 * GB)
    needed = 600 * GB + 8 * IDLE_RANK_RSS_BYTES
    assert line == (f"zero3 with optimizer+params offload on 8 GPUs needs ~{needed / GB:.1f} GB of host memory, "
                    "this machine has 500.0 GB available")


def test_nothing_that_fits_is_refused_some_that_fit_run_and_force_runs_all():
    assert decide({}, num_launchable=2, force=False) == ({}, ())
    with pytest.raises(UsageError, match=r"^ddp on 2 CPU ranks needs ~9 GB, .*; pass --force to run anyway$"):
        decide({"ddp": "ddp on 2 CPU ranks needs ~9 GB, this machine has 4 GB"}, num_launchable=1, force=False)
    with pytest.raises(UsageError, match=r"^no strategy fits this machine: ddp needs 9; fsdp2 needs 5; pass --force"):
        decide({"ddp": "ddp needs 9", "fsdp2": "fsdp2 needs 5"}, num_launchable=2, force=False)
    skipped, notices = decide({"ddp": "ddp needs 9"}, num_launchable=2, force=False)
    assert skipped == {"ddp": "not run: ddp needs 9; pass --force to run it"} and notices == ()
    assert decide({"ddp": "ddp needs 9"}, num_launchable=1, force=True) == ({}, ("--force: launched anyway: ddp needs 9",))


MODEL_PLANNED_AT_WIDTH = '''
import os
import torch
import torch.nn as nn

# Planned at WIDTH (the estimate); a real run (RANK is set only under torchrun) builds a
# 16-wide copy, so that --force never allocates what the estimate says.
WIDTH = {width}
REAL = "RANK" in os.environ


class Model(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(16))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build_model():
    return Model(16 if REAL else WIDTH)


def example_batch(batch_size):
    return torch.randn(batch_size, 16 if REAL else WIDTH)
'''
DDP_BYTES_PER_PARAM = 20.75
"""fp32 AdamW under ddp, this model's per-rank peak per parameter (planned: parameters, gradients,
DDP's bucket copies of them, Adam's two states); fsdp2's is 8.9, so fsdp2 fits where ddp needs
1.5 x the memory available."""


def _model_over_memory(write_model, ddp_share=1.5):
    """A model whose ddp run on 2 CPU ranks needs ``ddp_share`` x the memory available now."""
    available = available_memory().available_bytes
    num_params = (ddp_share * available / 2 - IDLE_RANK_RSS_BYTES) / DDP_BYTES_PER_PARAM
    width = max(16, int(math.sqrt(num_params / 16)))
    return write_model(MODEL_PLANNED_AT_WIDTH.format(width=width)), available


def _profile(*args):
    return CliRunner().invoke(main, ["profile", *args, "--device", "cpu", "--gpus", "2", "--precision", "fp32",
                                     "--steps", "1"], catch_exceptions=False)


NEEDS = r"ddp on 2 CPU ranks needs ~(\d+\.\d) GB, this machine has (\d+\.\d) GB available"


def test_a_profile_that_cannot_fit_is_refused_before_anything_is_launched(write_model, tmp_path):
    model, _ = _model_over_memory(write_model)
    out = tmp_path / "out"
    result = _profile(model, "--strategy", "ddp", "--out", str(out))
    assert result.exit_code == 2, result.output
    match = re.fullmatch(f"error: {NEEDS}; pass --force to run anyway", result.stderr.strip())
    assert match, result.stderr
    needed, available = float(match[1]), float(match[2])
    assert needed > available and needed == pytest.approx(1.5 * available, rel=0.3)
    assert not out.exists()  # refused before the results folder, let alone a launch


def test_force_launches_it_anyway_and_says_so(write_model, tmp_path):
    model, _ = _model_over_memory(write_model)
    out = tmp_path / "out"
    result = _profile(model, "--strategy", "ddp", "--out", str(out), "--force")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "profile.json").read_text())
    (run,) = document["runs"]
    assert run["status"] == "ok" and (out / "1-ddp" / "rank1.json").exists()  # launched (the 16-wide copy)
    (notice,) = [n for n in document["notices"] if n.startswith("--force")]
    assert re.fullmatch(f"--force: launched anyway: {NEEDS}", notice), notice


def test_of_several_strategies_those_that_cannot_fit_are_skipped_and_the_rest_run(write_model, tmp_path):
    model, available = _model_over_memory(write_model)
    if available < 4 * GB:
        pytest.skip(f"{available / GB:.1f} GB available: too little for fsdp2 to fit where ddp does not")
    out = tmp_path / "out"
    result = _profile(model, "--strategy", "ddp,fsdp2", "--out", str(out))
    assert result.exit_code == 0, result.output
    ddp, fsdp2 = json.loads((out / "profile.json").read_text())["runs"]
    assert ddp["status"] == "skipped" and re.fullmatch(f"not run: {NEEDS}; pass --force to run it", ddp["error"])
    assert ddp["estimate"]["peak_bytes"] > 0 and not (out / "1-ddp").exists()
    assert fsdp2["status"] == "ok", fsdp2["error"]
    assert "ddp (not run: estimate only)" in result.output  # its recommendation says it was not run
