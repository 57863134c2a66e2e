"""Canary for the private torch APIs in dpplan/planner/fake_device.py.

If one of these fails after a torch upgrade, the tracer needs updating: the failure names the API.
"""

import weakref

import pytest

import torch
import torch.nn.functional as F

from dpplan.planner import fake_device
from dpplan.planner.fake_device import FakeDeviceTensor, StorageTracer


def test_make_subclass_with_a_reported_device():
    meta = torch.empty(3, 4, device="meta")
    fake = FakeDeviceTensor(meta)
    assert fake.device == torch.device("cpu"), "prim.device dispatch no longer reports the fake device"
    assert fake.untyped_storage()._cdata == meta.untyped_storage()._cdata, "_make_subclass no longer shares storage"


def test_storage_python_objects_live_as_long_as_the_storage():
    meta = torch.empty(4, device="meta")
    storage = meta.untyped_storage()
    died = []
    ref = weakref.ref(storage, lambda _: died.append(True))
    del storage
    assert ref() is not None and not died, "storage PyObject is no longer preserved while the tensor lives"
    del meta
    assert died, "storage death no longer reaches weak references"


def _trace(fn):
    events = []
    tracer = StorageTracer(lambda key, nbytes: events.append(("alloc", nbytes)), lambda key: events.append(("free",)))
    with tracer:
        result = fn()
    return events, result


def test_ops_run_on_meta_and_report_new_storages():
    def step():
        x = fake_device.to_fake_device(torch.empty(8, 16, device="meta"))
        w = fake_device.to_fake_device(torch.empty(32, 16, device="meta"))
        y = F.linear(x, w)
        return y, y.device, type(y)

    events, (y, device, kind) = _trace(step)
    assert kind is FakeDeviceTensor and device == torch.device("cpu")
    assert ("alloc", 8 * 32 * 4) in events


def test_factory_functions_land_on_the_fake_device():
    events, (t, kind) = _trace(lambda: (lambda t: (t, type(t)))(torch.zeros(1000, 1000)))
    assert kind is FakeDeviceTensor
    assert ("alloc", 4_000_000) in events


def test_autocast_applies_to_fake_cpu_tensors():
    def step():
        x = fake_device.to_fake_device(torch.empty(2, 4, device="meta"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.linear(x, x).dtype

    _, dtype = _trace(step)
    assert dtype == torch.bfloat16


def test_item_returns_a_placeholder_instead_of_failing():
    _, value = _trace(lambda: torch.tensor(3.0).item())
    assert value == 1.0


def test_skip_weight_init_restores_initialisers():
    original = torch.nn.init.kaiming_uniform_
    with fake_device.skip_weight_init():
        assert torch.nn.init.kaiming_uniform_ is not original
    assert torch.nn.init.kaiming_uniform_ is original


def test_graph_task_id_is_minus_one_outside_backward():
    assert fake_device.current_graph_task_id() == -1


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
        return
    for seq, batch, inp, hidden in [(128, 2, 256, 256), (10, 3, 33, 17), (50, 9, 300, 64), (7, 1, 64, 100)]:
        real = _real_lstm_workspace_bytes(seq, batch, inp, hidden)
        rule = fake_device.onednn_lstm_workspace_bytes(seq, batch, inp, hidden)
        # The rule leaves out oneDNN's page padding (at most 8 pages), to stay proportional to the batch.
        assert 0 <= real - rule < 8 * 4096, (seq, batch, inp, hidden, real, rule)


def test_traced_lstm_keeps_its_workspace():
    def step():
        with torch.device("meta"):
            lstm = torch.nn.LSTM(32, 48, batch_first=True)
        fake_device.module_to_fake_device(lstm)
        x = fake_device.to_fake_device(torch.empty(5, 7, 32, device="meta", requires_grad=True))
        return lstm(x)

    events, _ = _trace(step)
    assert ("alloc", fake_device.onednn_lstm_workspace_bytes(7, 5, 32, 48)) in events


def test_slow_conv2d_columns_are_a_transient_of_the_op():
    x_shape, w_shape = (2, 8, 16, 16), (4, 8, 3, 3)
    real_x, real_w = torch.randn(x_shape, dtype=torch.bfloat16), torch.randn(w_shape, dtype=torch.bfloat16)
    backend = torch._C._select_conv_backend(real_x, real_w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, None)
    if backend != torch._C._ConvBackend.Slow2d:
        return  # this CPU runs bf16 convolutions in oneDNN

    def step():
        x = fake_device.to_fake_device(torch.empty(x_shape, dtype=torch.bfloat16, device="meta"))
        w = fake_device.to_fake_device(torch.empty(w_shape, dtype=torch.bfloat16, device="meta"))
        return F.conv2d(x, w, padding=1)

    events, _ = _trace(step)
    columns = 2 * (8 * 3 * 3) * (16 * 16) * 2  # N x C*kh*kw x H_out*W_out, bf16
    output = 2 * 4 * 16 * 16 * 2
    expected = [("alloc", output), ("alloc", columns), ("free",)]  # the columns die inside the op
    assert any(events[i : i + 3] == expected for i in range(len(events))), events


# -- oneDNN fp32 convolutions: the rule against the real kernel ------------------------------
# The real op runs under the profiler-based recorder (dpplan/profiler/cpu_memory.py); its peak
# above the level before the op and its net allocation are compared with the rule's sequence.


def _real_op_profile(fn) -> tuple[int, int, object]:
    from dpplan.profiler.cpu_memory import CpuMemoryRecorder

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


def _rule_profile(steps, outputs) -> tuple[int, int]:
    """Peak and net bytes of the sequence StorageTracer._replay_kernel plays for ``steps``."""
    sizes = [0 if o is None else o.untyped_storage().nbytes() for o in outputs]
    named = {step[1] for step in steps if step[0] == "out"}
    level = peak = sum(size for i, size in enumerate(sizes) if i not in named)
    live = {}
    for step in steps:
        if step[0] == "+":
            live[step[1]] = step[2]
            level += step[2]
        elif step[0] == "-":
            level -= live.pop(step[1], 0)
        else:
            level += sizes[step[1]]
        peak = max(peak, level)
    return peak, level


def _fake(tensor):
    return fake_device.to_fake_device(torch.empty_like(tensor, device="meta"))


def _onednn_conv_profiles(x_shape, w_shape, stride, padding, mask=None, bias=False):
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    b = torch.randn(w_shape[0]) if bias else None
    conv = (x, w, b, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1)
    if mask is None:
        peak, net, output = _real_op_profile(lambda: torch.ops.aten.convolution(*conv))
        steps = fake_device._convolution_steps((_fake(x), _fake(w), None if b is None else _fake(b)) + conv[3:])
        return (peak, net), _rule_profile(steps, [output])
    grad = torch.randn_like(torch.ops.aten.convolution(*conv))
    backward = (grad, x, w, [w_shape[0]] if bias else None) + conv[3:] + (mask,)
    peak, net, outputs = _real_op_profile(lambda: torch.ops.aten.convolution_backward(*backward))
    steps = fake_device._convolution_backward_steps((_fake(grad), _fake(x), _fake(w)) + backward[3:])
    return (peak, net), _rule_profile(steps, list(outputs))


def _onednn_avx2_fp32_convolutions() -> bool:
    x, w = torch.empty(2, 8, 8, 8), torch.empty(8, 8, 3, 3)
    backend = torch._C._select_conv_backend(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, None)
    return backend == torch._C._ConvBackend.Mkldnn and torch.backends.cpu.get_cpu_capability() == "AVX2"


_CONV_SHAPES = [
    ((2, 32, 16, 16), (32, 32, 3, 3), 1, 1),  # blocked source, weights and result
    ((2, 3, 16, 16), (16, 3, 3, 3), 1, 1),  # first layer: the source stays NCHW
    ((2, 12, 10, 10), (10, 12, 3, 3), 1, 1),  # channels padded to the 8-float block
    ((2, 32, 16, 16), (64, 32, 3, 3), 2, 1),
]


def test_onednn_convolution_buffers_match_the_real_kernel():
    if not _onednn_avx2_fp32_convolutions():
        pytest.skip("the oneDNN layouts are validated on AVX2 only")
    for shape in _CONV_SHAPES + [((2, 32, 16, 16), (64, 32, 1, 1), 1, 0)]:
        real, rule = _onednn_conv_profiles(*shape)
        assert real == rule, ("forward", shape, real, rule)
    for mask in ([True, True, False], [False, True, False], [True, False, False]):
        for shape in _CONV_SHAPES:
            if shape[2] != 1 and mask[0]:
                continue  # strided backward-data: below
            real, rule = _onednn_conv_profiles(*shape, mask=mask)
            assert real == rule, ("backward", mask, shape, real, rule)


def test_onednn_convolution_scratchpads_are_the_only_difference():
    """oneDNN's own scratchpads (brgconv's strided backward-data, jit_1x1's strided-source copy,
    bias padding) and brgconv's weight block choice are left out: the rule is a lower bound there
    and the op's net allocation (its outputs) is exact."""
    if not _onednn_avx2_fp32_convolutions():
        pytest.skip("the oneDNN layouts are validated on AVX2 only")
    cases = [
        dict(x_shape=(2, 32, 16, 16), w_shape=(64, 32, 3, 3), stride=2, padding=1, mask=[True, True, False]),
        dict(x_shape=(2, 12, 20, 20), w_shape=(20, 12, 3, 3), stride=2, padding=1, mask=[True, False, False]),
        dict(x_shape=(2, 32, 16, 16), w_shape=(64, 32, 1, 1), stride=2, padding=0),
        dict(x_shape=(2, 12, 10, 10), w_shape=(10, 12, 3, 3), stride=1, padding=1, mask=[True, True, True], bias=True),
    ]
    for case in cases:
        (real_peak, real_net), (rule_peak, rule_net) = _onednn_conv_profiles(**case)
        assert real_net == rule_net and rule_peak <= real_peak, (case, real_peak, rule_peak)


def test_traced_fp32_convolution_replays_the_onednn_copies():
    if not _onednn_avx2_fp32_convolutions():
        pytest.skip("the oneDNN layouts are validated on AVX2 only")

    def step():
        x = fake_device.to_fake_device(torch.empty(2, 16, 8, 8, device="meta"))
        w = fake_device.to_fake_device(torch.empty(16, 16, 3, 3, device="meta"))
        return F.conv2d(x, w, padding=1)

    events, _ = _trace(step)
    act, weights = 2 * 16 * 8 * 8 * 4, 16 * 16 * 3 * 3 * 4
    # source and weights reordered, oneDNN's result, the dense output, then the result freed
    expected = [("alloc", act), ("alloc", weights), ("alloc", act), ("free",), ("free",), ("alloc", act), ("free",)]
    assert any(events[i : i + 7] == expected for i in range(len(events))), events


def _lstm_op_profiles(seq, batch, inp, hidden):
    """(real, rule) peak and net bytes of oneDNN's f32 LSTM layer, forward then backward."""
    torch.manual_seed(0)
    x = torch.randn(seq, batch, inp)
    weights = [torch.randn(4 * hidden, inp), torch.randn(4 * hidden, hidden), torch.randn(4 * hidden), torch.randn(4 * hidden)]
    hx, cx = torch.zeros(batch, hidden), torch.zeros(batch, hidden)
    forward = (x, *weights, hx, cx, False, [], 2, hidden, 1, True, False, False, True)
    real_peak, real_net, outputs = _real_op_profile(lambda: torch.ops.aten.mkldnn_rnn_layer(*forward))
    fake = tuple(_fake(a) if isinstance(a, torch.Tensor) else a for a in forward)
    profiles = [((real_peak, real_net), _rule_profile(fake_device._mkldnn_rnn_layer_steps(fake), list(outputs)))]
    y, hy, cy, workspace = outputs
    backward = (x, *weights, hx, cx, y, hy, cy, torch.randn_like(y), torch.randn_like(hy), torch.randn_like(cy),
                False, 2, hidden, 1, True, True, False, [], False, workspace)
    real_peak, real_net, grads = _real_op_profile(lambda: torch.ops.aten.mkldnn_rnn_layer_backward(*backward))
    fake = tuple(_fake(a) if isinstance(a, torch.Tensor) else a for a in backward)
    profiles.append(((real_peak, real_net), _rule_profile(fake_device._mkldnn_rnn_layer_backward_steps(fake), list(grads))))
    return profiles


ONEDNN_RNN_SCRATCH_SLACK = 24 * 1024
"""The scratchpad pages the LSTM rule leaves out (fake_device._onednn_lstm_scratch_bytes)."""


def test_lstm_in_op_buffers_match_the_onednn_kernel():
    """Weight reorders, padded weight gradients, bias sums and the gates scratch of oneDNN's LSTM,
    all freed inside the op: the rule's peak is at most a few scratch pages under the kernel's,
    and the op leaves exactly its outputs."""
    # 48 and 256 features need padded gradient buffers (their good leading dimension differs), 64 not.
    for shape in [(16, 3, 32, 48), (20, 2, 64, 64), (8, 2, 256, 256)]:
        for (real_peak, real_net), (rule_peak, rule_net) in _lstm_op_profiles(*shape):
            assert rule_net == real_net, shape
            assert real_peak - ONEDNN_RNN_SCRATCH_SLACK <= rule_peak <= real_peak, (shape, real_peak, rule_peak)
