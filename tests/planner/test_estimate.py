"""planner/estimate.py: what ``fits`` and ``max_batch_size`` are judged against (the headroom)."""

from dataclasses import replace

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.estimate import estimate
from dpplan.training.model_file import load_model_file


def test_headroom_decides_fits_at_the_boundary(tiny_gpt):
    """A capacity the peak is 95% of: it fits with no headroom, not with the default 10%."""
    spec = load_model_file(tiny_gpt)
    config = PlanConfig(run=RunSpec(model=tiny_gpt, batch_size=2), strategies=("ddp",), gpus=(2,))
    peak = estimate(config, spec).estimates[0].peak_bytes
    capacity = int(peak / 0.95)
    assert 0.9 * capacity < peak <= capacity
    by_headroom = {pct: estimate(replace(config, capacity_bytes=capacity, headroom_pct=pct), spec).estimates[0]
                   for pct in (0.0, 10.0)}
    assert {pct: e.fits for pct, e in by_headroom.items()} == {0.0: True, 10.0: False}
    assert {e.peak_bytes for e in by_headroom.values()} == {peak}  # the headroom judges the peak, never changes it
    assert [e.headroom_pct for e in by_headroom.values()] == [0.0, 10.0]
    # the largest micro-batch fits the same usable bytes: at 10% not even the planned batch 2
    assert by_headroom[0.0].max_batch_size >= 2 > by_headroom[10.0].max_batch_size
