import re

import pytest
from rich.console import Console

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.estimate import estimate
from dpplan.planner.plan import Plan, PlanDocument
from dpplan.planner.strategies import STRATEGIES
from dpplan.reports.plan_table import merged_notes, render_plan
from dpplan.reports.units import format_gib
from tests.conftest import FIXTURES

WIDTHS = (80, 100, 120)


def test_notes_shared_by_strategies_are_said_once(tiny_mlp):
    plan = estimate(PlanConfig(run=RunSpec(model=tiny_mlp), strategies=("zero1", "zero2", "zero3"), gpus=(2, 4)))
    notes = merged_notes(plan)
    bucket_notes = [n for n in notes if "gradient bucket buffers" in n]
    assert bucket_notes == [n for n in bucket_notes if n.startswith("zero1, zero2, zero3: ")]
    assert len(bucket_notes) == 1
    assert len(notes) == len(set(notes))
    every_note = {n for e in plan.estimates for n in e.notes}
    assert len(notes) < len(every_note)


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    """Real plans whose tables differ in width: every strategy on 1/2/4/8 GPUs; tensor and
    sequence parallelism (the layout column); offload (the host column)."""
    gpt, blocks = str(FIXTURES / "tiny_gpt.py"), str(FIXTURES / "tp_blocks.py")
    return {
        "all strategies": estimate(PlanConfig(run=RunSpec(model=gpt), strategies=STRATEGIES, gpus=(1, 2, 4, 8))),
        "tp 2 + sp": estimate(PlanConfig(run=RunSpec(model=blocks, tp=2, sequence_parallel=True),
                                         strategies=("single", "fsdp2"), gpus=(2, 4, 8, 16))),
        "offload": estimate(PlanConfig(run=RunSpec(model=gpt, offload="optimizer"),
                                       strategies=("zero2", "zero3", "fsdp-full", "fsdp2"), gpus=(8, 64), nodes=8)),
    }


def _render(plan: Plan, width: int) -> str:
    console = Console(width=width, record=True)
    render_plan(PlanDocument(plan=plan, dpplan_version="test", created=None, command=None), console)
    return console.export_text()


def _row(lines: list[list[str]], leading: list[str]) -> list[str]:
    """The one table row whose cells start with ``leading`` (GPUs, layout, strategy, ...)."""
    found = [tokens for tokens in lines if tokens[:len(leading)] == leading]
    assert len(found) == 1, (leading, found)
    return found[0]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", ["all strategies", "tp 2 + sp", "offload"])
def test_key_numbers_are_never_cut(plans, name, width):
    """At 80, 100 and 120 columns every estimate's GPUs, layout, strategy, peak, fits and
    largest micro-batch are on its row whole, and its breakdown too (in the same or a second
    table); no line is wider than the terminal and nothing is ellipsised."""
    plan = plans[name]
    text = _render(plan, width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert [line for line in lines if "…" in line and "units (" not in line] == []  # "(blocks.0 … blocks.1)"
    rows = [line.split() for line in lines]
    for e in plan.estimates:
        leading = _leading(e)
        key = _row(rows, [*leading, format_gib(e.peak_bytes)])
        assert ("yes" if e.fits else "no") in key and str(e.max_batch_size) in key
        breakdown = [format_gib(e.breakdown[k]) for k in ("params", "grads", "optimizer", "activations", "other")]
        if key[len(leading) + 1:][:5] != breakdown:  # not beside the peak: in a table of its own
            _row(rows, leading + breakdown)
        if e.host_bytes is not None:
            assert format_gib(e.host_bytes) in text


def _leading(e) -> list[str]:
    """The cells that name an estimate's row: GPUs, layout (with --tp), strategy."""
    return [str(e.gpus), *(e.layout.split() if e.tp > 1 else []), e.strategy]


def test_a_wide_terminal_keeps_the_one_full_table(plans):
    text = _render(plans["offload"], 200)
    header = next(line for line in text.splitlines() if "strategy" in line)
    assert re.findall(r"GPUs|strategy|peak GiB|params|grads|optim|activ|other|fits|max batch|peak in|host GiB/node",
                      header) == ["GPUs", "strategy", "peak GiB", "params", "grads", "optim", "activ", "other", "fits",
                                  "max batch", "peak in", "host GiB/node"]
    assert "needs" not in text


def test_a_dropped_column_is_said_with_the_width_it_needs(plans):
    """At 80 columns the table of every strategy leaves out the phase of each peak, and says
    from which width it is shown."""
    plan = plans["all strategies"]

    def phases_shown(text: str) -> bool:
        rows = [line.split() for line in text.splitlines()]
        return all(e.peak_phase in _row(rows, [*_leading(e), format_gib(e.peak_bytes)]) for e in plan.estimates)

    narrow = _render(plan, 80)
    needed = int(re.search(r"peak in \(the phase of each peak\) needs (\d+) columns", narrow).group(1))
    assert 80 < needed <= 120
    assert not any(e.peak_phase in line.split() for e in plan.estimates for line in narrow.splitlines()
                   if line.split()[:len(_leading(e))] == _leading(e))
    at_needed = _render(plan, needed)
    assert phases_shown(at_needed) and "needs" not in at_needed
    assert "needs" in _render(plan, needed - 1)


def test_the_activation_list_names_the_strategy_it_was_traced_for(tiny_gpt):
    """Under bf16-mixed single keeps autocast's copies and FSDP2 casts its parameters: their
    traces keep other bytes, and the list is the first strategy's (planner/estimate.py)."""
    def plan(*strategies):
        return estimate(PlanConfig(run=RunSpec(model=tiny_gpt), strategies=strategies, gpus=(1, 2)))

    fsdp2_first, single_first = plan("fsdp2", "single"), plan("single", "fsdp2")
    assert fsdp2_first.model.top_activation_modules != single_first.model.top_activation_modules
    assert fsdp2_first.model.top_activation_modules == plan("fsdp2").model.top_activation_modules
    assert "(per micro-batch, one rank of fsdp2 on 1 or 2 GPUs):" in _render(fsdp2_first, 200)
    assert "(per micro-batch, one rank of single on 1 GPU):" in _render(single_first, 200)
    # single runs on one GPU only: planning 2, its trace is still the one read, and that is said
    on_two = estimate(PlanConfig(run=RunSpec(model=tiny_gpt), strategies=("single", "ddp"), gpus=(2,)))
    assert on_two.model.top_activation_modules == single_first.model.top_activation_modules
    assert "one rank of single, traced though not planned at these GPU counts):" in _render(on_two, 200)
