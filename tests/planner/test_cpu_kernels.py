"""The CPU target's in-op buffers (planner/cpu_kernels.py) against the real kernels of this CPU.

The probe measures each op at the plan's micro-batch and the next; these tests run the real kernel
at the plan's batch and at a larger one under the profiler-based recorder the accuracy runs use
(profiler/cpu_memory.py) and check that the replayed steps give its peak above the level before
the op and its net allocation exactly: the replay and the extrapolation to other batch sizes
both hold, on whatever ISA runs the tests.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dpplan.planner import cpu_kernels, data_dependent, fake_device

aten = torch.ops.aten
TRACE_BATCH = 1009
PLAN_BATCH = 2
EXTRAPOLATED_BATCH = 5


@contextlib.contextmanager
def _rank_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_kernels.CPU_RANK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _real_op_profile(fn) -> tuple[int, int, object]:
    from dpplan.profiler.cpu_memory import CpuMemoryRecorder

    with _rank_threads():
        fn()  # oneDNN creates its primitive on the first call
        recorder = CpuMemoryRecorder(keep_allocations=True).start()
        with recorder.mark("op"):
            outputs = fn()
        timeline = recorder.stop()
    start, end = timeline.mark_spans("op")[0]
    level = peak = 0
    for allocation in timeline.allocations:
        if start <= allocation.time_ns <= end:
            level += allocation.delta_bytes
            peak = max(peak, level)
    return peak, level, outputs


def _replayed_profile(steps, outputs, batch: int) -> tuple[int, int]:
    """Peak and net bytes of ``steps`` (sizes at the trace batch) replayed at ``batch``, as
    StorageTracer._replay_kernel plays them: outputs no step names first, buffers freed at the end."""
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    sizes = [o.untyped_storage().nbytes() if isinstance(o, torch.Tensor) and o.numel() else 0 for o in outputs]
    named = {step[1] for step in steps if step[0] == "out"}
    level = peak = sum(size for i, size in enumerate(sizes) if i not in named)
    live = {}
    for step in steps:
        if step[0] == "+":
            nbytes = step[2] * batch // TRACE_BATCH if step[1].endswith("b") else step[2]
            live[step[1]] = nbytes
            level += nbytes
        elif step[0] == "-":
            level -= live.pop(step[1], 0)
        else:
            level += sizes[step[1]]
        peak = max(peak, level)
    return peak, level - sum(live.values())


def _at_batch(shape, batch):
    return tuple(batch if d == "B" else d for d in shape)


def _tensors(specs, batch, device):
    torch.manual_seed(0)
    made = []
    for spec in specs:
        if not isinstance(spec, tuple) or not spec or not isinstance(spec[0], tuple):
            made.append(spec)
            continue
        shape, dtype = spec
        shape = _at_batch(shape, batch)
        if dtype in (torch.int64, torch.int32):
            made.append(torch.zeros(shape, dtype=dtype, device=device))
        else:
            made.append(torch.randn(shape, device="cpu").to(dtype).to(device))
    return tuple(made)


def _check(func, specs):
    """The probe's steps (measured at PLAN_BATCH and the next batch) against the real kernel at
    PLAN_BATCH, where they must be exact, and at EXTRAPOLATED_BATCH (a linear extrapolation)."""
    meta_args = _tensors(specs, TRACE_BATCH, "meta")
    steps = cpu_kernels.in_op_steps(func, meta_args, {}, TRACE_BATCH, cache_key=None, batch_size=PLAN_BATCH)
    for batch in (PLAN_BATCH, EXTRAPOLATED_BATCH):
        real_args = _tensors(specs, batch, "cpu")
        real_peak, real_net, outputs = _real_op_profile(lambda: func(*real_args))  # noqa: B023 (called in this iteration)
        replay_peak, replay_net = _replayed_profile(steps or [], outputs, batch)
        assert (replay_peak, replay_net) == (real_peak, real_net), (func, batch, steps)


F32, BF16 = torch.float32, torch.bfloat16
CONV_SHAPES = [
    # input, weight, stride, padding
    (("B", 3, 32, 32), (8, 3, 4, 4), 4, 0),  # a patch stem: the source stays plain
    (("B", 32, 16, 16), (32, 32, 3, 3), 1, 1),
    (("B", 12, 10, 10), (10, 12, 3, 3), 1, 1),  # channels padded to the block
    (("B", 32, 16, 16), (64, 32, 3, 3), 2, 1),  # strided backward-data
    (("B", 32, 16, 16), (64, 32, 1, 1), 2, 0),  # a strided 1x1 (jit_1x1 copies the source)
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_convolution_forward_and_backward(shape, dtype):
    x, w, stride, padding = shape
    conv = [[stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1]
    _check(aten.convolution.default, [(x, dtype), (w, dtype), ((w[0],), dtype), *conv])
    out = (("B", w[0], (x[2] + 2 * padding - w[2]) // stride + 1, (x[3] + 2 * padding - w[3]) // stride + 1), dtype)
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        _check(aten.convolution_backward.default, [out, (x, dtype), (w, dtype), [w[0]], *conv, mask])


def test_grouped_and_1d_convolutions():
    depthwise = [[1], [0], [1], False, [0], 64]  # ConvNeXt- and wav2vec2-style convolutions
    _check(aten.convolution.default, [(("B", 64, 50), F32), ((64, 1, 3), F32), None, *depthwise])
    _check(aten.convolution_backward.default,
           [(("B", 64, 48), F32), (("B", 64, 50), F32), ((64, 1, 3), F32), None, *depthwise, [True, True, False]])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_flash_attention_forward_and_backward(dtype):
    q = (("B", 4, 96, 32), dtype)
    _check(aten._scaled_dot_product_flash_attention_for_cpu.default, [q, q, q, 0.0, True])
    lse = (("B", 4, 96), F32)
    _check(aten._scaled_dot_product_flash_attention_for_cpu_backward.default, [q, q, q, q, q, lse, 0.0, True])


def test_normalizations():
    x = (("B", 50, 64), F32)
    w = ((64,), F32)
    stats = (("B", 50, 1), F32)
    _check(aten.native_layer_norm.default, [x, [64], w, w, 1e-5])
    _check(aten.native_layer_norm_backward.default, [x, x, [64], stats, stats, w, w, [True, True, True]])
    image = (("B", 16, 8, 8), F32)
    channel = ((16,), F32)
    _check(aten.native_batch_norm.default, [image, channel, channel, channel, channel, True, 0.1, 1e-5])
    _check(aten.native_batch_norm_backward.default,
           [image, image, channel, channel, channel, channel, channel, True, 1e-5, [True, True, True]])


def test_embedding_backward_and_safe_softmax():
    _check(aten.embedding_dense_backward.default, [(("B", 20, 32), F32), (("B", 20), torch.int64), 100, -1, False])
    _check(aten._safe_softmax.default, [(("B", 4, 30, 30), F32), -1])


def test_lstm_layer_forward_and_backward():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN: LSTMs do not run through mkldnn_rnn_layer")
    seq, inp, hidden = 16, 32, 48
    weights = [((4 * hidden, inp), F32), ((4 * hidden, hidden), F32), ((4 * hidden,), F32), ((4 * hidden,), F32)]
    state = (("B", hidden), F32)
    x = ((seq, "B", inp), F32)
    _check(aten.mkldnn_rnn_layer.default, [x, *weights, state, state, False, [], 2, hidden, 1, True, False, False, True])


def test_probe_keeps_the_threads_and_the_rng_of_the_caller():
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    meta = torch.empty(TRACE_BATCH, 8, 8, 8, device="meta")
    cpu_kernels.in_op_steps(aten.native_layer_norm.default, (meta, [8], None, None, 1e-5), {}, TRACE_BATCH, None)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)


def test_an_op_too_large_to_run_is_skipped_with_a_reason():
    big = torch.empty(TRACE_BATCH * 8192, 8192, device="meta")  # 512 MiB at batch 2
    with pytest.raises(cpu_kernels.ProbeSkipped, match="MiB"):
        cpu_kernels.in_op_steps(aten.native_layer_norm.default, (big, [8192], None, None, 1e-5), {}, TRACE_BATCH, None)


def test_scaled_dims():
    assert cpu_kernels._scale_dim(TRACE_BATCH * 7, TRACE_BATCH, 2) == 14
    assert cpu_kernels._scale_dim(TRACE_BATCH**2 * 3, TRACE_BATCH, 2) == 12
    assert cpu_kernels._scale_dim(64, TRACE_BATCH, 2) == 64


# -- outputs the CPU kernel returns in another size than the meta kernel -----------------------


def _real_lstm_workspace_bytes(seq, batch, inp, hidden):
    x = torch.randn(seq, batch, inp)
    w_ih, w_hh = torch.randn(4 * hidden, inp), torch.randn(4 * hidden, hidden)
    b_ih, b_hh = torch.randn(4 * hidden), torch.randn(4 * hidden)
    h = torch.zeros(batch, hidden)
    outputs = torch.ops.aten.mkldnn_rnn_layer(
        x, w_ih, w_hh, b_ih, b_hh, h, h.clone(), False, [], 2, hidden, 1, True, False, False, True
    )
    return outputs[3].numel()


def test_lstm_workspace_rule_matches_the_onednn_kernel():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN: LSTMs do not run through mkldnn_rnn_layer")
    for seq, batch, inp, hidden in [(128, 2, 256, 256), (10, 3, 33, 17), (50, 9, 300, 64), (7, 1, 64, 100)]:
        real = _real_lstm_workspace_bytes(seq, batch, inp, hidden)
        rule = cpu_kernels.onednn_lstm_workspace_bytes(seq, batch, inp, hidden)
        # The rule leaves out oneDNN's page padding (at most 8 pages), to stay proportional to the batch.
        assert 0 <= real - rule < 8 * 4096, (seq, batch, inp, hidden, real, rule)


def _trace(fn, **tracer_settings):
    events = []
    tracer = fake_device.StorageTracer(
        lambda key, nbytes: events.append(("alloc", nbytes)), lambda key: events.append(("free",)), **tracer_settings
    )
    with tracer:
        result = fn()
    return events, result, tracer


def test_traced_lstm_keeps_its_workspace():
    def step():
        with torch.device("meta"):
            lstm = torch.nn.LSTM(32, 48, batch_first=True)
        fake_device.module_to_fake_device(lstm)
        x = fake_device.to_fake_device(torch.empty(5, 7, 32, device="meta", requires_grad=True))
        return lstm(x)

    events, _, _ = _trace(step)
    assert ("alloc", cpu_kernels.onednn_lstm_workspace_bytes(7, 5, 32, 48)) in events


def test_the_tracer_replays_a_convolutions_buffers_at_the_trace_batch():
    """The measured buffers are born and freed inside the op, and scale with the trace batch."""
    import torch.nn.functional as F

    x = fake_device.to_fake_device(torch.empty(TRACE_BATCH, 16, 8, 8, device="meta"))
    w = fake_device.to_fake_device(torch.empty(16, 16, 3, 3, device="meta"))

    def step():
        return F.conv2d(x, w, padding=1)

    events, output, tracer = _trace(step, trace_batch_size=TRACE_BATCH, kernel_batch_size=PLAN_BATCH)
    steps = cpu_kernels.in_op_steps(
        torch.ops.aten.convolution.default,
        (torch.empty(TRACE_BATCH, 16, 8, 8, device="meta"), torch.empty(16, 16, 3, 3, device="meta"), None,
         [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        {}, TRACE_BATCH, None, batch_size=PLAN_BATCH,
    )
    born = [nbytes for kind, *rest in events if kind == "alloc" for nbytes in rest]
    buffers = [step[2] for step in steps or [] if step[0] == "+" and step[2]]
    assert buffers
    assert sorted(born) == sorted(buffers + [output.untyped_storage().nbytes()])
    assert len([e for e in events if e[0] == "free"]) == len(buffers)  # all freed inside the op
    assert not tracer.notes


# -- the survey: no op outside the measured set allocates inside itself ------------------------


def _ops_with_in_op_buffers(model_path: str, precision: str) -> dict[str, int]:
    """Run one real training step with every aten op marked, under the profiler; per op, the
    most it allocated beyond its outputs while it ran, for the calls the probe would not measure."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.utils._python_dispatch import TorchDispatchMode

    from dpplan.training.model_file import load_model_file
    from dpplan.training.optimizers import build_optimizer
    from dpplan.training.training_step import autocast_context, run_training_step

    spec = load_model_file(model_path)
    torch.manual_seed(0)
    model, batch = spec.build_model(), spec.example_batch(2)
    optimizer = build_optimizer("adamw", model.parameters(), device_type="cpu")

    def step():
        run_training_step(model, optimizer, batch, spec.loss_fn, grad_accum=1, no_sync=None,
                          autocast=lambda: autocast_context(precision, "cpu", True))

    calls: list = []

    class Marked(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            with record_function(f"dpplan_op_{len(calls)}"):
                calls.append(None)
                out = func(*args, **(kwargs or {}))
            outputs = out if isinstance(out, (list, tuple)) else [out]
            ptrs = {o.untyped_storage().data_ptr() for o in outputs if isinstance(o, torch.Tensor) and o.numel()}
            probed = (cpu_kernels.needs_probe(func, args) or func in cpu_kernels.RULED_OPS
                      or data_dependent.indexes_with_mask(func, args))
            calls[-1] = (str(func), ptrs, probed)
            return out

    with _rank_threads():
        step()  # the optimizer state exists from here on
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorder, Marked():
            step()
    missed: dict[str, int] = {}

    def allocations(node, found):
        if type(node.extra_fields).__name__.endswith("Allocation"):
            found.append(node.extra_fields)
        for child in node.children:
            allocations(child, found)
        return found

    def visit(node):
        if node.name.startswith("dpplan_op_"):
            name, ptrs, probed = calls[int(node.name[len("dpplan_op_"):])]
            level = peak = outputs = 0
            for event in allocations(node, []):
                level += event.alloc_size
                peak = max(peak, level)
                outputs += event.alloc_size if event.alloc_size > 0 and event.ptr in ptrs else 0
            if not probed and peak - outputs > cpu_kernels.SURVEY_MIN_BYTES:
                missed[name] = max(missed.get(name, 0), peak - outputs)
            return
        for child in node.children:
            visit(child)

    for root in recorder.profiler.kineto_results.experimental_event_tree():
        visit(root)
    return missed


@pytest.mark.parametrize(("model", "precision"), [("tiny_gpt", "fp32"), ("tiny_gpt", "bf16-mixed"), ("tiny_cnn", "bf16-mixed")])
def test_no_op_outside_the_measured_set_allocates_inside_itself(model, precision):
    """The canary for PROBED_OPS and needs_probe: on this CPU, every op of a real step either
    allocates nothing beyond its outputs or is measured. A torch or oneDNN release whose kernel
    starts to allocate inside an op fails here, naming it."""
    from tests.conftest import FIXTURES

    assert _ops_with_in_op_buffers(str(FIXTURES / f"{model}.py"), precision) == {}


@pytest.mark.parametrize(("model", "precision"), [("vit", "bf16-mixed"), ("wav2vec2", "fp32"), ("qwen3_moe", "fp32"),
                                                  ("convnext", "bf16-mixed")])
def test_third_party_models_allocate_inside_no_op_outside_the_measured_set(model, precision):
    pytest.importorskip("transformers", reason="the third-party zoo is built with transformers")
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "models" / "hf" / f"{model}.py"
    assert _ops_with_in_op_buffers(str(path), precision) == {}
