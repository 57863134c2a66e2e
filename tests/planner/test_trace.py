import numpy as np
import pytest

from dpplan.planner.trace import (
    ACTIVATION,
    AUTOCAST,
    GRADIENT,
    OPTIMIZER_STATE,
    PARAM_CAST,
    PARAMETER,
    TRACE_BATCH_SIZE,
    TraceError,
    TraceSettings,
    trace_step,
)
from dpplan.training.model_file import load_model_file

TINY_MLP_PARAMS = (64 * 128 + 128) + 2 * (128 * 128 + 128) + (128 * 32 + 32)  # 45,472


def peak_at(trace, batch):
    return int(trace.live_bytes(batch).max())


def test_tiny_mlp_peak_worked_out_by_hand(tiny_mlp):
    """fp32 AdamW on CPU: the peak is in the optimizer step. Parameters, gradients and the two
    moments (4 x 4 bytes per parameter), 4-byte step counters (8 tensors), the input, and the
    per-parameter loop's temporaries for the largest tensor: sqrt(exp_avg_sq) and its division
    by the bias correction alive together (2 x 128 x 128 x 4 bytes), while the previous
    iteration's ``denom`` (a 128-element bias) is still referenced by its loop variable."""
    trace = trace_step(load_model_file(tiny_mlp), TraceSettings(precision="fp32"))
    batch = 4
    expected = 4 * 4 * TINY_MLP_PARAMS + 8 * 4 + batch * 64 * 4 + 2 * 128 * 128 * 4 + 128 * 4
    assert peak_at(trace, batch) == expected
    assert sum(p.numel for p in trace.params) == TINY_MLP_PARAMS


def test_categories_cover_parameters_gradients_and_state(tiny_mlp):
    trace = trace_step(load_model_file(tiny_mlp), TraceSettings(precision="fp32"))
    sizes = trace.storage_bytes_at(4)
    assert sizes[trace.storage_category == PARAMETER].sum() == 4 * TINY_MLP_PARAMS
    assert sizes[trace.storage_category == GRADIENT].sum() == 4 * TINY_MLP_PARAMS
    # exp_avg + exp_avg_sq + 4-byte step per parameter tensor
    assert sizes[trace.storage_category == OPTIMIZER_STATE].sum() == 8 * TINY_MLP_PARAMS + 8 * 4
    assert all(p.grad_storage >= 0 for p in trace.params)
    assert {p.unit for p in trace.params} == {0, 1, 2}  # two blocks + the root


def test_one_trace_answers_every_batch_size(tiny_gpt):
    """Tracing at the prime batch size and rescaling equals tracing at the batch size itself.

    Compared after each allocation: frees that happen together (one Python statement dropping
    several tensors) may be reported in either order, which moves no level that matters."""
    spec = load_model_file(tiny_gpt)
    # A GPU target: CPU kernels' in-op buffers are fitted at the plan's batch instead
    # (tests/planner/test_cpu_kernels.py checks them at other batch sizes).
    settings = TraceSettings(precision="bf16-mixed", device_type="cuda")
    at_prime = trace_step(spec, settings)
    for batch in (1, 3):
        direct = trace_step(spec, settings, batch_size=batch)
        allocs = direct.event_sign > 0
        assert np.array_equal(at_prime.event_sign > 0, allocs)
        assert np.array_equal(at_prime.live_bytes(batch)[allocs], direct.live_bytes(batch)[allocs])
    assert at_prime.trace_batch_size == TRACE_BATCH_SIZE


def test_attention_runs_the_fused_cpu_kernel_not_the_math_path(tiny_gpt):
    """On the meta device SDPA would keep the S x S attention matrix; the fake device does not."""
    from tests.fixtures import tiny_gpt as model

    trace = trace_step(load_model_file(tiny_gpt), TraceSettings(precision="fp32"), batch_size=2)
    scores_bytes = 2 * model.HEADS * model.SEQ * model.SEQ * 4
    assert scores_bytes not in set(trace.storage_bytes.tolist())


def test_autocast_computes_in_bf16(tiny_mlp):
    trace = trace_step(load_model_file(tiny_mlp), TraceSettings(precision="bf16-mixed", family=AUTOCAST), batch_size=2)
    activations = trace.storage_bytes[trace.storage_category == ACTIVATION]
    assert 2 * 128 * 2 in activations  # a bf16 [2, 128] layer output
    params = trace.storage_bytes[trace.storage_category == PARAMETER]
    assert params.sum() == 4 * TINY_MLP_PARAMS  # parameters stay fp32 under autocast


def test_param_cast_family_traces_low_precision_parameters(tiny_mlp):
    trace = trace_step(load_model_file(tiny_mlp), TraceSettings(precision="bf16-mixed", family=PARAM_CAST))
    assert trace.storage_bytes[trace.storage_category == PARAMETER].sum() == 2 * TINY_MLP_PARAMS


def test_gradient_accumulation_keeps_gradients_through_the_next_forward(tiny_mlp):
    spec = load_model_file(tiny_mlp)
    one = trace_step(spec, TraceSettings(precision="fp32"))
    two = trace_step(spec, TraceSettings(precision="fp32", num_micro_batches=2, grad_accum=2))
    forward_two = two.markers_of("micro_batch")[1].event
    assert two.live_bytes(4)[forward_two] >= one.live_bytes(4)[one.num_baseline_events - 1] + 4 * TINY_MLP_PARAMS


def test_checkpointing_recomputes_inside_backward(tiny_gpt):
    spec = load_model_file(tiny_gpt)
    plain = trace_step(spec, TraceSettings(precision="fp32"))
    checkpointed = trace_step(spec, TraceSettings(precision="fp32", activation_checkpointing=True))
    assert checkpointed.markers_of("recompute_start")
    assert checkpointed.checkpointing == "units"
    backward = lambda t: t.markers_of("backward")[0].event  # noqa: E731
    assert checkpointed.live_bytes(8)[backward(checkpointed)] < plain.live_bytes(8)[backward(plain)]


def test_unit_markers_bracket_forward_and_backward(tiny_gpt):
    trace = trace_step(load_model_file(tiny_gpt), TraceSettings(precision="fp32"))
    for unit in (0, 1):
        kinds = [m.kind for m in trace.markers if m.index == unit and m.kind in ("fwd_start", "fwd_end", "bwd_start", "bwd_end")]
        assert kinds == ["fwd_start", "fwd_end", "bwd_start", "bwd_end"]


def test_data_dependent_shapes_are_planned_at_their_upper_bound(write_model):
    path = write_model(
        """
        import torch
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.fc = torch.nn.Linear(4, 4)
            def forward(self, x):
                return self.fc(x[x > 0].view(-1, 4))
        def build_model(): return M()
        def example_batch(b): return torch.randn(b, 4)
        """
    )
    trace = trace_step(load_model_file(path), TraceSettings(), batch_size=3)
    assert any("aten.index.Tensor" in note and "upper bound" in note for note in trace.notes)
    fc_input = 3 * 4 * 4  # every entry selected: 12 floats
    assert fc_input in trace.storage_bytes.tolist()


def test_an_op_without_an_upper_bound_names_the_op_and_the_module(write_model):
    path = write_model(
        """
        import torch
        class Counter(torch.nn.Module):
            def forward(self, x):
                return torch.bincount(x.long().flatten()).float()
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.fc = torch.nn.Linear(4, 4); self.counter = Counter()
            def forward(self, x):
                return self.fc(x).sum() + self.counter(x).sum()
        def build_model(): return M()
        def example_batch(b): return torch.randn(b, 4)
        """
    )
    with pytest.raises(TraceError, match=r"aten.bincount.default in module counter \(Counter\).*data"):
        trace_step(load_model_file(path), TraceSettings())


def test_input_the_model_rejects(write_model):
    path = write_model(
        """
        import torch
        def build_model(): return torch.nn.Linear(4, 4)
        def example_batch(b): return torch.randn(b, 5)
        """
    )
    with pytest.raises(TraceError, match="rejected its example batch"):
        trace_step(load_model_file(path), TraceSettings())


def test_traces_do_not_leak_into_each_other_through_the_op_cache(tiny_gpt):
    """Op outputs are cached across traces. A kernel that returns a view although its schema
    promises a fresh tensor (``_unsafe_view``) once made a later trace count a storage birth
    that the clean trace did not have."""
    from dpplan.planner.fake_device import op_cache

    spec = load_model_file(tiny_gpt)
    autocast = TraceSettings(precision="bf16-mixed", family=AUTOCAST)
    param_cast = TraceSettings(precision="bf16-mixed", family=PARAM_CAST, cast_buffers=True)
    op_cache.OP_CACHE.clear()
    clean = trace_step(spec, autocast, batch_size=3)
    op_cache.OP_CACHE.clear()
    trace_step(spec, param_cast, batch_size=3)
    after_other = trace_step(spec, autocast, batch_size=3)
    allocs = clean.event_sign > 0
    assert np.array_equal(allocs, after_other.event_sign > 0)
    assert np.array_equal(clean.live_bytes(3)[allocs], after_other.live_bytes(3)[allocs])


def test_checkpointing_keeps_the_host_rng_state_on_cpu_targets(tiny_gpt):
    """Non-reentrant checkpointing saves the CPU generator state per checkpointed unit (and
    once more while recomputing): host memory, so counted for a CPU target only."""
    import torch

    state_bytes = torch.get_rng_state().numel()
    spec = load_model_file(tiny_gpt)
    on_cpu = trace_step(spec, TraceSettings(precision="fp32", activation_checkpointing=True), batch_size=2)
    births = on_cpu.storage_bytes.tolist()
    num_units = len(on_cpu.unit_names) - 1  # the root is not checkpointed
    assert births.count(state_bytes) == 2 * num_units  # forward + recompute, per unit
    on_gpu = trace_step(
        spec, TraceSettings(precision="fp32", activation_checkpointing=True, device_type="cuda"), batch_size=2
    )
    assert state_bytes not in on_gpu.storage_bytes.tolist()


def test_backward_end_and_optimizer_start_are_distinct_positions(tiny_gpt):
    """What a strategy inserts at the end of backward must not read as optimizer-step memory."""
    trace = trace_step(load_model_file(tiny_gpt), TraceSettings(precision="fp32"), batch_size=2)
    last_backward_end = max(m.event for m in trace.markers if m.kind == "bwd_end")
    optimizer = next(m.event for m in trace.markers if m.kind == "optimizer")
    assert last_backward_end < optimizer
