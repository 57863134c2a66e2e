"""planner/recommendation.py: which estimate a plan recommends, and what to change when none fits.

Each rule of the module docstring is checked by a pair of hand-built estimates where that rule,
and only it, decides; then the rule on a real plan.
"""

import pytest

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.estimate import estimate
from dpplan.planner.plan import ChangeKind
from dpplan.planner.recommendation import recommend
from tests.records import strategy_estimate

GiB = 1 << 30


def _estimate(strategy, gpus, peak_gib, *, fits=True, **fields):
    breakdown = fields.pop("breakdown", {"params": 0, "grads": 0, "optimizer": 0, "activations": 0, "other": 0})
    fields.setdefault("max_batch_size", 1 if fits else 0)
    return strategy_estimate(strategy=strategy, gpus=gpus, peak_bytes=int(peak_gib * GiB), fits=fits,
                             capacity_bytes=80 * GiB, headroom_pct=10.0, breakdown=breakdown, **fields)


def test_fewest_gpus_before_most_room():
    rec = recommend([_estimate("fsdp2", 4, 10), _estimate("ddp", 2, 60)])
    assert (rec.fits, rec.strategy, rec.gpus) == (True, "ddp", 2)


def test_most_room_among_the_same_gpus():
    rec = recommend([_estimate("ddp", 2, 60), _estimate("fsdp2", 2, 50), _estimate("zero3", 2, 55)])
    assert (rec.strategy, rec.peak_bytes) == ("fsdp2", 50 * GiB)


def test_no_offload_before_most_room():
    """--offload optimizer: ddp has none (planned without it), zero2 offloads and peaks lower."""
    rec = recommend([_estimate("ddp", 2, 60, offload="optimizer"), _estimate("zero2", 2, 30, offload="optimizer")])
    assert (rec.strategy, rec.offload) == ("ddp", "none")
    rec = recommend([_estimate("zero3", 2, 40, offload="optimizer"), _estimate("zero2", 2, 30, offload="optimizer")])
    assert (rec.strategy, rec.offload) == ("zero2", "optimizer")


def test_single_on_one_gpu_before_a_wrapper_over_one_rank():
    rec = recommend([_estimate("single", 1, 60), _estimate("fsdp-full", 1, 59)])
    assert rec.strategy == "single"
    rec = recommend([_estimate("single", 1, 90, fits=False), _estimate("fsdp-full", 1, 70)])
    assert rec.strategy == "fsdp-full"  # single does not fit: the rule falls through to the wrapper


def test_data_parallel_is_recommended_only_alone():
    assert recommend([_estimate("dp", 2, 10), _estimate("ddp", 2, 60)]).strategy == "ddp"
    assert recommend([_estimate("dp", 2, 10)]).strategy == "dp"
    assert recommend([]) is None


def test_nothing_fits_names_the_closest_and_what_to_change():
    activations = {"params": 10 * GiB, "grads": 10 * GiB, "optimizer": 40 * GiB, "activations": 30 * GiB, "other": 0}
    closest = _estimate("zero3", 8, 90, fits=False, batch_size=4, max_batch_size=0, breakdown=activations)
    rec = recommend([_estimate("ddp", 8, 200, fits=False, batch_size=4), closest,
                     _estimate("zero3", 4, 150, fits=False, batch_size=4)])
    assert (rec.fits, rec.strategy, rec.gpus, rec.peak_bytes) == (False, "zero3", 8, 90 * GiB)
    assert rec.usable_bytes == int(80 * GiB * 0.9)
    assert _changes(rec) == [
        (ChangeKind.CHECKPOINTING, "--activation-checkpointing", "zero3", 8, 30 * GiB),
        (ChangeKind.MORE_GPUS, "--gpus 16", "zero3", 8, 60 * GiB),
        (ChangeKind.OFFLOAD_OPTIMIZER, "--offload optimizer", "zero3", 8, 40 * GiB),
    ]


def _changes(rec):
    return [(c.kind, c.flags, c.strategy, c.gpus, c.nbytes) for c in rec.changes]


def test_more_gpus_only_where_they_brought_the_peak_down():
    """zero3 peaks lower on 4 GPUs than on 8 (say, inter-node buffers): more GPUs is not suggested."""
    state = {"params": 10 * GiB, "grads": 0, "optimizer": 0, "activations": 0, "other": 0}
    rec = recommend([_estimate("zero3", 4, 85, fits=False, breakdown=state),
                     _estimate("zero3", 8, 88, fits=False, breakdown=state)])
    assert rec.gpus == 4 and ChangeKind.MORE_GPUS not in {c.kind for c in rec.changes}


def test_nothing_fits_at_the_batch_but_a_smaller_one_does():
    rec = recommend([_estimate("fsdp2", 8, 75, fits=False, batch_size=8, max_batch_size=6, activation_checkpointing=True,
                               offload="optimizer")])
    assert _changes(rec) == [(ChangeKind.SMALLER_BATCH, "--batch-size 6", "fsdp2", 8, 0)]


def test_replicating_strategies_are_told_to_shard_and_zero_to_offload_parameters():
    state = {"params": 20 * GiB, "grads": 20 * GiB, "optimizer": 40 * GiB, "activations": 0, "other": 0}
    rec = recommend([_estimate("ddp", 8, 85, fits=False, breakdown=state)])
    assert _changes(rec) == [
        (ChangeKind.SHARDING, "--strategy fsdp2,zero3", "ddp", 8, 80 * GiB),
        (ChangeKind.OFFLOAD_OPTIMIZER, "--offload optimizer --strategy fsdp2,zero3", "ddp", 8, 40 * GiB),
    ]
    rec = recommend([_estimate("zero2", 8, 85, fits=False, breakdown=state, offload="optimizer")])
    assert _changes(rec)[-1] == (ChangeKind.OFFLOAD_PARAMS, "--offload optimizer+params --strategy zero3", "zero2", 8,
                                 20 * GiB)
    rec = recommend([_estimate("fsdp2", 8, 85, fits=False, breakdown=state, offload="optimizer")])
    assert ChangeKind.OFFLOAD_PARAMS not in {c.kind for c in rec.changes}  # FSDP's offload moves parameters already
    rec = recommend([_estimate("zero3", 8, 85, fits=False, breakdown=state, device="cpu", gpu=None)])
    assert not {ChangeKind.OFFLOAD_OPTIMIZER, ChangeKind.OFFLOAD_PARAMS} & {c.kind for c in rec.changes}


@pytest.fixture(scope="module")
def tiny_gpt_plan():
    from tests.conftest import FIXTURES

    config = PlanConfig(run=RunSpec(model=str(FIXTURES / "tiny_gpt.py"), batch_size=2), strategies=("ddp", "fsdp2"),
                        gpus=(2, 16))
    return estimate(config)


def test_a_real_plan_recommends_by_the_rule(tiny_gpt_plan):
    plan = tiny_gpt_plan
    at_two = [e for e in plan.estimates if e.gpus == 2]
    lowest = min(at_two, key=lambda e: e.peak_bytes)
    rec = plan.recommendation
    assert rec is not None and rec.fits
    assert (rec.strategy, rec.gpus, rec.peak_bytes, rec.max_batch_size) == (
        lowest.strategy, 2, lowest.peak_bytes, lowest.max_batch_size)
    assert rec.usable_bytes == int(lowest.capacity_bytes * 0.9) and rec.headroom_pct == 10.0


def test_a_real_plan_that_does_not_fit(tiny_gpt_plan):
    """The same plan on a capacity below every peak: the closest estimate and what would help."""
    from dataclasses import replace

    capacity = min(e.peak_bytes for e in tiny_gpt_plan.estimates) // 2
    plan = estimate(replace(tiny_gpt_plan.config, capacity_bytes=capacity))
    rec = plan.recommendation
    assert rec is not None and not rec.fits and not any(e.fits for e in plan.estimates)
    closest = min(plan.estimates, key=lambda e: e.peak_bytes)
    assert (rec.strategy, rec.gpus, rec.peak_bytes) == (closest.strategy, closest.gpus, closest.peak_bytes)
    assert rec.usable_bytes == int(capacity * 0.9)
    kinds = [c.kind for c in rec.changes]
    assert ChangeKind.CHECKPOINTING in kinds and ChangeKind.OFFLOAD_OPTIMIZER in kinds
