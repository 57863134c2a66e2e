"""reports/plan_recommendation.py: the recommendation, headroom and nodes as the table and the HTML say them."""

import json

from click.testing import CliRunner

from dpplan.cli import main
from dpplan.config import PlanConfig
from dpplan.planner.plan import ChangeKind, FitChange, PlanDocument, PlanRecommendation
from dpplan.reports.plan_recommendation import headroom_text, nodes_text, recommendation_line

GiB = 1 << 30


def _recommendation(**fields) -> PlanRecommendation:
    values = dict(fits=True, strategy="fsdp2", gpus=8, nodes=1, layout="dp8", batch_size=4, max_batch_size=12,
                  offload="none", peak_bytes=int(61.2 * GiB), usable_bytes=72 * GiB, capacity_bytes=80 * GiB,
                  headroom_pct=10.0)
    values.update(fields)
    return PlanRecommendation(**values)


def test_the_line_when_it_fits():
    assert recommendation_line(_recommendation()) == (
        "recommended: fsdp2 on 8 GPUs, micro-batch 4 (up to 12 fits), no offload (peak 61.20 GiB of 72.00 GiB usable)")
    line = recommendation_line(_recommendation(gpus=16, nodes=2, layout="dp8 x tp2 +sp", max_batch_size=4,
                                               offload="optimizer"))
    assert line == ("recommended: fsdp2 on 16 GPUs (2 nodes, dp8 x tp2 +sp), micro-batch 4, offload optimizer "
                    "(peak 61.20 GiB of 72.00 GiB usable)")


def test_the_line_when_nothing_fits_says_the_closest_and_what_to_change():
    changes = [
        FitChange(kind=ChangeKind.SMALLER_BATCH, flags="--batch-size 2", strategy="zero3", gpus=8, nbytes=0),
        FitChange(kind=ChangeKind.CHECKPOINTING, flags="--activation-checkpointing", strategy="zero3", gpus=8,
                  nbytes=30 * GiB),
        FitChange(kind=ChangeKind.MORE_GPUS, flags="--gpus 16", strategy="zero3", gpus=8, nbytes=60 * GiB),
        FitChange(kind=ChangeKind.OFFLOAD_OPTIMIZER, flags="--offload optimizer", strategy="zero3", gpus=8,
                  nbytes=40 * GiB),
    ]
    line = recommendation_line(_recommendation(fits=False, strategy="zero3", max_batch_size=0, peak_bytes=90 * GiB,
                                               changes=changes))
    assert line == (
        "recommended: nothing fits at micro-batch 4; closest: zero3 on 8 GPUs, no offload, peak 90.00 GiB of "
        "72.00 GiB usable; try --batch-size 2 (zero3 on 8 GPUs fits it; a larger --grad-accum keeps the samples per "
        "step); --activation-checkpointing (activations are 30.00 GiB of the peak); --gpus 16 (zero3 shards its "
        "60.00 GiB of parameters, gradients and optimizer state per GPU over them); --offload optimizer (optimizer "
        "state is 40.00 GiB of the peak)")


def test_nodes_and_headroom_in_words():
    assert nodes_text(PlanConfig()) == "8 GPUs per node (h100-80gb's usual node)"
    assert nodes_text(PlanConfig(gpu="t4-16gb")) == "4 GPUs per node (t4-16gb's usual node)"
    assert nodes_text(PlanConfig(gpus_per_node=4)) == "4 GPUs per node"
    assert nodes_text(PlanConfig(nodes=2, gpus=(2, 4))) == "2 nodes" and nodes_text(PlanConfig(nodes=1)) == "1 node"
    assert nodes_text(PlanConfig(device="cpu")) == "1 node"
    assert headroom_text(PlanConfig()) == "fits: peak <= 90% of the memory (10% headroom)"
    assert headroom_text(PlanConfig(headroom_pct=2.5)) == "fits: peak <= 97.5% of the memory (2.5% headroom)"


def test_the_terminal_output_ends_with_the_recommendation_of_the_json(tiny_gpt, tmp_path):
    path = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["estimate", tiny_gpt, "--strategy", "ddp,fsdp2", "--gpus", "2,16",
                                       "--json", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-1] == f"wrote {path}"
    document = PlanDocument.from_json(json.loads(path.read_text()))
    assert document.plan.recommendation is not None
    assert lines[-2] == recommendation_line(document.plan.recommendation)
    assert lines[-2].startswith("recommended: ") and " on 2 GPUs, micro-batch 1 " in lines[-2]
    words = " ".join(result.output.split())  # the header wraps at the console's width
    assert "8 GPUs per node (h100-80gb's usual node)" in words
    assert "fits: peak <= 90% of the memory (10% headroom)" in words
