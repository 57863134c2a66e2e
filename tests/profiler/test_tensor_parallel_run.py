"""Real tensor-parallel runs (DTensor over gloo, torchrun) of the zoo's small Llama: each rank
holds 1/tp of the split layers, and the ranks of one tensor-parallel group see one batch and
compute one loss, the unsplit model's. ~4 s per 2-rank run, ~7 s per 4-rank one here."""

import pytest
import torch
from torch import nn

from dpplan.config import RunConfig, RunSpec
from dpplan.errors import UsageError
from dpplan.profiler.cpu_run import run_cpu
from dpplan.profiler.tensor_parallel_run import tensor_parallel_mesh
from dpplan.training.model_file import build_module, load_model_file
from tests.conftest import FIXTURES

TP_LLAMA = str(FIXTURES.parents[1] / "benchmarks" / "models" / "llama.py")
"""4 layers, grouped-query attention (8 heads, 2 KV heads), vocabulary 8000: tp 2 at most."""
BATCH_SIZE = 2
LOSS_RTOL = 1e-5
"""The split model sums partial products in another order than the whole one (fp32)."""


def _unsplit():
    """The model and first batch as rank 0 of data-parallel group 0 draws them (seed 0),
    whole, on one process: its parameter bytes by kind and its first loss."""
    spec = load_model_file(TP_LLAMA)
    torch.manual_seed(0)
    model = build_module(spec)
    batch = spec.example_batch(BATCH_SIZE)
    with torch.no_grad():
        loss = spec.loss_fn(model(**batch), batch).item()
    # Every linear and the embedding of this model is split (Megatron's rule names them all);
    # the RMSNorm weights are held whole on every rank.
    split = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))
                for p in m.parameters(recurse=False))
    whole = sum(p.numel() * p.element_size() for p in model.parameters()) - split
    return split, whole, loss


def _run(strategy, ranks, **settings):
    spec = RunSpec(model=TP_LLAMA, batch_size=BATCH_SIZE, precision="fp32", tp=2, **settings)
    return run_cpu(RunConfig(run=spec, strategy=strategy, steps=1), ranks, timeout_s=180)


def _groups(results):
    """Rank results by data-parallel coordinate: {dp_rank: [tensor_parallel record, ...]}."""
    groups: dict[int, list[dict]] = {}
    for result in results:
        record = result["tensor_parallel"]
        groups.setdefault(record["dp_rank"], []).append(record)
    return groups


def test_two_ranks_hold_half_the_split_layers_and_compute_the_whole_models_loss():
    split, whole, loss = _unsplit()
    results = _run("single", 2)
    for rank, result in enumerate(results):
        record = result["tensor_parallel"]
        assert (record["tp_rank"], record["dp_rank"]) == (rank, 0)
        assert record["split_param_bytes"] == split // 2
        assert record["replicated_param_bytes"] == whole
        assert result["steady_peak_bytes"] > split // 2
    first, second = (r["tensor_parallel"] for r in results)
    assert first["batch_sha256"] == second["batch_sha256"]
    assert first["losses"] == second["losses"]
    assert first["losses"][0] == pytest.approx(loss, rel=LOSS_RTOL)


def test_fsdp2_over_two_tensor_parallel_groups_with_sequence_parallelism():
    """dp 2 x tp 2: ranks 0,1 and 2,3 are the tensor-parallel groups (tp innermost); each
    group draws its own batch and agrees on every micro-batch's loss."""
    split, whole, _ = _unsplit()
    results = _run("fsdp2", 4, sequence_parallel=True, grad_accum=2)
    groups = _groups(results)
    assert sorted(groups) == [0, 1]
    for records in groups.values():
        assert [r["tp_rank"] for r in records] == [0, 1]
        assert len({r["batch_sha256"] for r in records}) == 1
        assert records[0]["losses"] == records[1]["losses"]
        assert len(records[0]["losses"]) == 2 * 2  # warm-up and timed step, two micro-batches each
        for record in records:
            assert (record["split_param_bytes"], record["replicated_param_bytes"]) == (split // 2, whole)
    assert groups[0][0]["batch_sha256"] != groups[1][0]["batch_sha256"]
    assert [r["rank"] for r in results] == [0, 1, 2, 3]


def test_the_world_must_divide_into_tensor_parallel_groups():
    single = RunConfig(run=RunSpec(model=TP_LLAMA, tp=2), strategy="single")
    with pytest.raises(UsageError, match="does not divide the 3 ranks"):
        tensor_parallel_mesh(single, 3, "cpu")
    with pytest.raises(UsageError, match="single with --tp 2 runs on 2 ranks, not 4"):
        tensor_parallel_mesh(single, 4, "cpu")


def test_dpplan_profile_runs_a_tensor_parallel_replica_on_tp_ranks(tmp_path):
    """`dpplan profile --gpus 2 --tp 2 --strategy single`: one replica over both ranks is run
    (not skipped as a single-device strategy on 2 ranks), measured beside its estimate."""
    import json

    from click.testing import CliRunner

    from dpplan.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["profile", TP_LLAMA, "--device", "cpu", "--gpus", "2", "--tp", "2",
                                       "--strategy", "single", "--batch-size", str(BATCH_SIZE), "--steps", "1",
                                       "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = json.loads((out / "profile.json").read_text())["runs"]
    assert run["status"] == "ok", run["error"]
    assert run["estimate"]["peak_bytes"] > 0 and run["measured"]["peak_allocated_bytes"] > 0
