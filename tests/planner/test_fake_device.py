"""Canary for the private torch APIs in dpplan/planner/fake_device.py.

If one of these fails after a torch upgrade, the tracer needs updating: the failure names the API.
"""

import weakref

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
