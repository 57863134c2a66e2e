from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.estimate import estimate
from dpplan.reports.plan_table import merged_notes


def test_notes_shared_by_strategies_are_said_once(tiny_mlp):
    plan = estimate(PlanConfig(run=RunSpec(model=tiny_mlp), strategies=("zero1", "zero2", "zero3"), gpus=(2, 4)))
    notes = merged_notes(plan)
    bucket_notes = [n for n in notes if "gradient bucket buffers" in n]
    assert bucket_notes == [n for n in bucket_notes if n.startswith("zero1, zero2, zero3: ")]
    assert len(bucket_notes) == 1
    assert len(notes) == len(set(notes))
    every_note = {n for e in plan.estimates for n in e.notes}
    assert len(notes) < len(every_note)
