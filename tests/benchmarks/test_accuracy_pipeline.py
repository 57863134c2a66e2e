"""The pipeline suite of benchmarks/accuracy.py (``--suite pipeline``): its cases are runs torch's
schedules can take on at most 4 ranks, the grid is whole, and every real rank is compared with
its own pipeline rank's plan. The runs themselves are the suite (docs/accuracy_pipeline.md)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from dpplan.config import RunSpec
from dpplan.models import default_gpt
from dpplan.training.pipeline_layout import PipelineLayout

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def accuracy():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("accuracy")


def _layers(accuracy, model: str) -> int:
    if model == accuracy.DEFAULT_GPT:
        return default_gpt.NUM_LAYERS
    assert model.startswith(str(accuracy.PIPELINE_DECODERS))
    return 8  # benchmarks/models/pipeline_decoders.py NUM_LAYERS (importing it needs transformers)


def test_every_case_is_a_pipeline_torch_can_run_on_at_most_4_ranks(accuracy):
    for case in accuracy.pipeline_suite():
        run, strategy = accuracy.case_run(case)  # RunSpec checks the schedule's micro-batches
        assert isinstance(run, RunSpec) and accuracy.suite_of(case) == "pipeline"
        dp = case.ranks // (case.pp * case.tp)
        assert case.ranks <= 4 and case.ranks == dp * case.tp * case.pp, case.label
        assert strategy in (("ddp", "fsdp2") if dp > 1 else ("single",)), case.label
        layout = PipelineLayout(pp=case.pp, schedule=case.pp_schedule, num_micro_batches=case.grad_accum)
        assert layout.num_stages <= _layers(accuracy, case.model), case.label


def test_the_grid_covers_every_exact_schedule_alone_with_tp_and_with_ddp(accuracy):
    cases = accuracy.pipeline_suite()
    settings = {(c.pp, c.pp_schedule, c.tp, c.strategy, c.precision) for c in cases}
    for schedule in accuracy.PIPELINE_SCHEDULES:
        for precision in ("fp32", "bf16-mixed"):
            for pp, tp, strategy in ((2, 1, "single"), (2, 2, "single"), (2, 1, "ddp"), (4, 1, "single")):
                assert (pp, schedule, tp, strategy, precision) in settings
    schedules = {c.pp_schedule for c in cases}
    assert {"zero-bubble", "zbv"} <= schedules
    assert {(c.pp_schedule, c.precision) for c in cases if c.strategy == "fsdp2"} >= {("1f1b", "bf16-mixed"),
                                                                                      ("gpipe", "fp32")}
    assert {c.pp_schedule for c in cases if c.activation_checkpointing} >= {"1f1b", "interleaved-1f1b", "zero-bubble"}
    assert len({c.label for c in cases}) == len(cases)


def test_each_real_rank_is_compared_with_its_own_pipeline_ranks_plan(accuracy):
    # pp is the outermost mesh axis: a pipeline rank is num_ranks // pp neighbouring ranks
    assert [accuracy.pipeline_rank_of(r, 4, 2) for r in range(4)] == [0, 0, 1, 1]
    assert [accuracy.pipeline_rank_of(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    case = accuracy.pipeline_case(accuracy.DEFAULT_GPT, 2, "1f1b", "ddp2")
    result = accuracy.Result(case=case, estimate_bytes=200, estimate_per_rank=[100, 100, 200, 200],
                             measured_bytes=200, measured_per_rank=[100, 125, 200, 160])
    assert result.rank_errors_pct == [0.0, -20.0, 0.0, 25.0]
    assert result.error_pct == 0.0  # the heaviest plan against the heaviest rank
