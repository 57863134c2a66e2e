"""Real expert-parallel runs (torchrun, gloo) of the zoo's Mixtral against the plan: with a
router balanced by construction every rank's measured peak is the plan's, and each rank holds
its share of the experts."""

import pytest

from dpplan.config import PlanConfig, RunConfig, RunSpec
from dpplan.planner.estimate import estimate
from dpplan.profiler.cpu_run import run_cpu
from tests.conftest import FIXTURES

pytest.importorskip("transformers")

BALANCED_MIXTRAL = str(FIXTURES.parents[1] / "benchmarks" / "models" / "moe_balanced_router.py") + ":mixtral"
"""The zoo's Mixtral (2 layers, 4 experts, top-2) with each pair routed round-robin."""
TOLERANCE_PCT = 0.1
"""The accuracy target per rank (benchmarks/accuracy.py --suite expert-parallel)."""


def test_each_rank_of_an_expert_group_peaks_where_the_plan_says():
    run = RunSpec(model=BALANCED_MIXTRAL, batch_size=2, precision="fp32", ep=2)
    planned = estimate(PlanConfig(run=run, strategies=("fsdp2",), gpus=(2,), device="cpu")).estimates[0]
    assert (planned.dp, planned.ep) == (2, 2)
    results = run_cpu(RunConfig(run=run, strategy="fsdp2", steps=2), 2, timeout_s=300)
    records = [r["expert_parallel"] for r in results]
    assert [(r["ep_rank"], r["edp"]) for r in records] == [(0, 1), (1, 1)]
    assert records[0]["expert_param_bytes"] == records[1]["expert_param_bytes"] > 0
    for result in results:
        error = 100 * (planned.peak_bytes - result["steady_peak_bytes"]) / result["steady_peak_bytes"]
        assert abs(error) <= TOLERANCE_PCT, (result["rank"], planned.peak_bytes, result["steady_peak_bytes"])
