"""A deep stack of alike layers is traced at three and four layers and built to full depth:
the result must be the full trace itself, and anything the rule cannot vouch for is traced
in full."""

from pathlib import Path

import pytest
import torch

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner import fake_device
from dpplan.planner.estimate import estimate
from dpplan.planner.no_dynamo import dynamo_untouched
from dpplan.planner.strategies import STRATEGIES
from dpplan.planner.trace import PARAM_CAST, TRACE_BATCH_SIZE, TraceSettings, repeated_layers, trace_step
from dpplan.planner.trace.steady_step import trace_model
from dpplan.training.model_file import build_module, load_model_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY_GPT_SIZES = "VOCAB, SEQ, HIDDEN, LAYERS, HEADS = 512, 32, 64, 2, 4"


def deep_gpt_source(layers: int = 9) -> str:
    source = (FIXTURES / "tiny_gpt.py").read_text()
    assert TINY_GPT_SIZES in source
    return source.replace(TINY_GPT_SIZES, f"VOCAB, SEQ, HIDDEN, LAYERS, HEADS = 512, 32, 64, {layers}, 4")


@pytest.fixture
def deep_gpt(write_model) -> str:
    return write_model(deep_gpt_source(), "deep_gpt.py")


def traced_both_ways(path: str, settings: TraceSettings):
    """(built from short traces or None, traced in full)."""
    spec = load_model_file(path)
    with dynamo_untouched():
        with torch.device("meta"), fake_device.skip_weight_init():
            model, twin = build_module(spec), build_module(spec)
        repeated = repeated_layers.trace_by_repeating(
            model, settings.wrap,
            lambda short, units: trace_model(spec, short, settings, TRACE_BATCH_SIZE, units=units),
        )
        full = trace_model(spec, twin, settings, TRACE_BATCH_SIZE)
    return repeated, full


SETTINGS = {
    "fp32-cpu-adamw": TraceSettings(precision="fp32"),
    "bf16-autocast": TraceSettings(precision="bf16-mixed"),
    "bf16-fsdp1-cast": TraceSettings(precision="bf16-mixed", family=PARAM_CAST, cast_buffers=True),
    "checkpointing": TraceSettings(precision="bf16-mixed", activation_checkpointing=True),
    "accum-cuda-foreach-fp16": TraceSettings(
        precision="fp16-mixed", num_micro_batches=2, grad_accum=2, device_type="cuda"
    ),
    "bf16-sgd-momentum": TraceSettings(precision="bf16", optimizer="sgd-momentum"),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_built_trace_is_the_full_trace(deep_gpt, name):
    """Same events in the same order, the same storages (size, kind, module, owner), the same
    markers and parameters: only the numbering of storages, and the order of frees that
    happen together, may differ."""
    repeated, full = traced_both_ways(deep_gpt, SETTINGS[name])
    assert repeated is not None, repeated_layers.last_reason[:1]
    assert len(repeated.unit_names) == 10
    assert repeated_layers.canonical_form(repeated) == repeated_layers.canonical_form(full)
    assert repeated.num_ops == full.num_ops


def test_estimates_do_not_change(deep_gpt, monkeypatch):
    """Every strategy, GPU memory terms included, plans the same bytes from either trace."""
    config = PlanConfig(run=RunSpec(model=deep_gpt, batch_size=3, precision="bf16-mixed"), gpus=(1, 2, 8), device="cuda")
    built = estimate(config)
    monkeypatch.setattr(repeated_layers, "MIN_LAYERS", 10**6)
    full = estimate(config)
    assert built.model.num_traced_ops == full.model.num_traced_ops
    assert (built.model.repeated_layers, full.model.repeated_layers) == (9, 0)  # said in the outputs
    assert built.estimates == full.estimates
    assert len(built.estimates) == 1 + 3 * (len(STRATEGIES) - 1)  # single at 1 GPU; the others at 1, 2 and 8


def test_trace_step_takes_the_short_way_for_deep_models(deep_gpt, write_model, monkeypatch):
    calls = []
    real = repeated_layers.extend
    monkeypatch.setattr(repeated_layers, "extend", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    trace_step(load_model_file(deep_gpt), TraceSettings(precision="fp32"))
    assert calls == [4, 9]  # checked against the four-layer trace, then built to nine
    calls.clear()
    trace_step(load_model_file(write_model(deep_gpt_source(repeated_layers.MIN_LAYERS - 1), "shallow.py")),
               TraceSettings(precision="fp32"))
    assert calls == []


ODD_LAYERS_DIFFER = """
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, index):
            super().__init__()
            self.index = index
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            y = self.fc(x)
            if CONDITION:  # some layers keep one more tensor for backward
                y = y * torch.sigmoid(y)
            return x + y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block(i) for i in range(10))
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    def build_model():
        return Net()

    def example_batch(batch_size):
        return torch.randn(batch_size, 32)
"""


@pytest.mark.parametrize(
    "condition, reason",
    [
        ("self.index % 2", "layers allocate different numbers of storages"),  # seen in 3 layers
        ("self.index >= 3", "the rule does not reproduce the four-layer trace"),  # only in 4
    ],
)
def test_layers_that_behave_differently_are_traced_in_full(write_model, condition, reason):
    """The layers look alike (same modules and shapes) but some compute more. Seen already in
    the three-layer trace, or only when the rule is checked against four layers: either way
    the model is traced in full."""
    path = write_model(ODD_LAYERS_DIFFER.replace("CONDITION", condition))
    repeated, full = traced_both_ways(path, TraceSettings(precision="fp32"))
    assert repeated is None
    assert repeated_layers.last_reason[0] == reason
    via_step = trace_step(load_model_file(path), TraceSettings(precision="fp32"))
    assert repeated_layers.canonical_form(via_step) == repeated_layers.canonical_form(full)


@pytest.mark.parametrize(
    "change, why",
    [
        ("self.blocks[3].fc = nn.Linear(32, 32, bias=False)", "layers differ in parameters"),
        ("self.blocks[5].fc.weight = self.blocks[4].fc.weight", "layers share a parameter"),
        ("self.head.weight = self.blocks[0].fc.weight", "a layer shares a parameter with the rest"),
    ],
)
def test_unlike_or_shared_layers_are_no_stack(write_model, change, why):
    source = ODD_LAYERS_DIFFER.replace("CONDITION", "False").replace(
        "self.head = nn.Linear(32, 4)", "self.head = nn.Linear(32, 32)\n            " + change
    )
    spec = load_model_file(write_model(source))
    with torch.device("meta"):
        model = build_module(spec)
    assert repeated_layers.find_layer_stack(model, None) is None, why


def test_stack_found_under_a_wrap_class(deep_gpt):
    spec = load_model_file(deep_gpt)
    with torch.device("meta"):
        model = build_module(spec)
    stack = repeated_layers.find_layer_stack(model, "Block")
    assert stack is not None and stack.prefix == "blocks."
    assert stack.layer_of("blocks.7.fc.weight") == 7 and stack.layer_of("wte.weight") == -1
    assert stack.renamed("blocks.1.ln_1.bias", 8) == "blocks.8.ln_1.bias"
    assert repeated_layers.find_layer_stack(model, "Linear") is None  # units outside one list
