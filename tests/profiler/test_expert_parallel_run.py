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


@pytest.mark.parametrize(("model", "ranks", "coordinates"), [
    (BALANCED_MIXTRAL, 2, [(0, 1), (1, 1)]),  # two experts per rank, held whole
    # one expert per rank, split on dim 1 over the 2 ranks that hold it
    (BALANCED_MIXTRAL.replace(":mixtral", ":mixtral_2_experts"), 4, [(0, 2), (1, 2), (0, 2), (1, 2)]),
])
def test_each_rank_of_an_expert_group_peaks_where_the_plan_says(model, ranks, coordinates):
    run = RunSpec(model=model, batch_size=2, precision="fp32", ep=2)
    planned = estimate(PlanConfig(run=run, strategies=("fsdp2",), gpus=(ranks,), device="cpu")).estimates[0]
    assert (planned.dp, planned.ep) == (ranks, 2)
    results = run_cpu(RunConfig(run=run, strategy="fsdp2", steps=2), ranks, timeout_s=300)
    records = [r["expert_parallel"] for r in results]
    assert [(r["ep_rank"], r["edp"]) for r in records] == coordinates
    assert len({r["expert_param_bytes"] for r in records}) == 1 and records[0]["expert_param_bytes"] > 0
    for result in results:
        error = 100 * (planned.peak_bytes - result["steady_peak_bytes"]) / result["steady_peak_bytes"]
        assert abs(error) <= TOLERANCE_PCT, (result["rank"], planned.peak_bytes, result["steady_peak_bytes"])
