"""RankTimeline semantics on a hand-made trace: three storages, two markers."""

import numpy as np

from dpplan.planner.timeline import RankTimeline
from dpplan.planner.trace import ACTIVATION, GRADIENT, PARAMETER, Marker, StepTrace, TraceSettings

PRIME = 1009


def make_trace() -> StepTrace:
    # storage 0: parameter 1000 B (baseline); storage 1: activation 10 B per sample; storage 2: gradient 1000 B
    # events: +0 | marker A | +1 | +2 | marker B | -1
    return StepTrace(
        settings=TraceSettings(),
        trace_batch_size=PRIME,
        event_storage=np.array([0, 1, 2, 1]),
        event_sign=np.array([1, 1, 1, -1]),
        storage_bytes=np.array([1000, 10 * PRIME, 1000]),
        storage_batch_degree=np.array([0, 1, 0]),
        storage_category=np.array([PARAMETER, ACTIVATION, GRADIENT]),
        storage_module=np.array([-1, -1, -1]),
        storage_owner=np.array([0, -1, 0]),
        num_baseline_events=1,
        markers=[Marker(event=1, kind="A"), Marker(event=3, kind="B")],
        params=[],
        unit_names=["(root)"],
        module_names=["(root)"],
        module_classes=["M"],
        num_ops=0,
    )


def test_plain_replay_and_batch_scaling():
    timeline = RankTimeline(make_trace())
    assert timeline.levels(1).tolist() == [1000, 1010, 2010, 2000]
    assert timeline.peak(5).peak_bytes == 2050
    assert timeline.peak(5).bytes_by_category["activation"] == 50


def test_scale_shards_a_storage():
    timeline = RankTimeline(make_trace())
    timeline.scale(0, 0.25)
    assert timeline.peak(1).peak_bytes == 250 + 10 + 1000


def test_insert_orders_before_the_trace_event_of_that_position():
    timeline = RankTimeline(make_trace())
    timeline.insert(1, 500, GRADIENT)  # before storage 1 is born
    timeline.insert(3, -500, GRADIENT)  # before storage 1 dies
    assert timeline.levels(1).tolist() == [1000, 1500, 1510, 2510, 2010, 2000]


def test_free_at_moves_a_death_into_a_marker_sequence():
    timeline = RankTimeline(make_trace())
    timeline.free_at(2, 3)  # the gradient dies at marker B, before the activation
    assert timeline.levels(1).tolist() == [1000, 1010, 2010, 1010, 1000]


def test_max_batch_size_is_exact():
    timeline = RankTimeline(make_trace())
    # peak(b) = 2000 + 10 b
    assert timeline.max_batch_size(2000 + 10 * 37) == 37
    assert timeline.max_batch_size(2000 + 10 * 37 - 1) == 36
    assert timeline.max_batch_size(1000) == 0


def test_a_moved_death_frees_the_size_at_the_time_of_the_move():
    timeline = RankTimeline(make_trace())
    timeline.scale(1, 0.5)
    timeline.free_at(1, 3)  # the activation, 5 B per sample now, dies at marker B
    timeline.scale(1, 2.0)  # born at 20 B per sample, but the move freed 5
    assert timeline.levels(2).tolist() == [1000, 1040, 2040, 2030, 2030]  # not back to 2000


def test_copies_are_independent():
    timeline = RankTimeline(make_trace())
    timeline.insert(1, 500, GRADIENT)
    twin = timeline.copy()
    twin.insert(3, -500, GRADIENT)
    twin.scale(0, 0.0)
    assert timeline.levels(1).tolist() == [1000, 1500, 1510, 2510, 2500]
    assert twin.levels(1).tolist() == [0, 500, 510, 1510, 1010, 1000]
