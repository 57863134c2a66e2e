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


def test_item_returns_a_placeholder_where_the_value_is_unknown():
    def step():
        x = fake_device.to_fake_device(torch.empty(4, device="meta"))
        return x.sum().item()

    _, value = _trace(step)
    assert value == 1.0


def test_values_computed_from_constants_are_known():
    """Hugging Face's masking code asks whether position ids (an arange) are one sequence per row;
    the trace answers as the real run does, and sizes boolean indexing from known masks."""
    def step():
        positions = torch.arange(6).expand(3, -1)
        packed = (torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        single_sequences = bool((packed[:, -1] == 0).all())
        x = fake_device.to_fake_device(torch.empty(3, 6, 4, device="meta"))
        selected = x[positions % 2 == 0]
        return single_sequences, tuple(selected.shape), torch.tensor(3.0).item()

    _, (single_sequences, shape, item) = _trace(step)
    assert single_sequences and shape == (9, 4) and item == 3.0


def test_an_in_place_write_from_unknown_data_forgets_the_value():
    def step():
        mask = torch.zeros(5, dtype=torch.bool)
        known = tuple(fake_device.to_fake_device(torch.empty(5, 2, device="meta"))[mask].shape)
        data = fake_device.to_fake_device(torch.empty(5, dtype=torch.bool, device="meta"))
        mask.copy_(data)  # now the mask is whatever the data was
        bounded = tuple(fake_device.to_fake_device(torch.empty(5, 2, device="meta"))[mask].shape)
        return known, bounded

    _, (known, bounded) = _trace(step)
    assert known == (0, 2) and bounded == (5, 2)  # unknown: planned at the upper bound


def test_data_dependent_ops_without_values_are_planned_at_their_upper_bound():
    def step():
        x = fake_device.to_fake_device(torch.empty(4, 3, device="meta"))
        labels = fake_device.to_fake_device(torch.empty(4, 3, dtype=torch.long, device="meta"))
        return tuple(labels.masked_select(labels >= 0).shape), tuple(torch.nonzero(x).shape)

    events = []
    tracer = StorageTracer(lambda key, nbytes: events.append(nbytes), lambda key: None)
    with tracer:
        selected, nonzero = step()
    assert selected == (12,) and nonzero == (12, 2)
    assert any("upper bound" in note for note in tracer.notes)


def test_skip_weight_init_restores_initialisers():
    original = torch.nn.init.kaiming_uniform_
    with fake_device.skip_weight_init():
        assert torch.nn.init.kaiming_uniform_ is not original
    assert torch.nn.init.kaiming_uniform_ is original


def test_graph_task_id_is_minus_one_outside_backward():
    assert fake_device.current_graph_task_id() == -1




# -- where meta kernels differ from the device kernels --------------------------------------------


def test_indexing_with_a_list_after_ellipsis_stays_in_the_tracing_mode():
    """``x[..., [-2], :]`` (Falcon's fused QKV split) passes its index list as [None, tensor]."""
    def step():
        x = fake_device.to_fake_device(torch.empty(2, 5, 7, 4, device="meta"))
        return x[..., [-2], :]

    _, result = _trace(step)
    assert type(result) is FakeDeviceTensor and tuple(result.shape) == (2, 5, 1, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_mm_is_planned_in_any_dtype_the_kernels_take(dtype):
    """The meta kernel demands bf16; the CPU kernel (and CUDA's fallback) take fp32 as well."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    tokens, experts, hidden, ffn = 12, 3, 8, 16
    real = torch._grouped_mm(torch.randn(tokens, hidden, dtype=dtype), torch.randn(experts, hidden, ffn, dtype=dtype),
                             offs=torch.tensor([4, 8, 12], dtype=torch.int32))

    def step():
        a = fake_device.to_fake_device(torch.empty(tokens, hidden, dtype=dtype, device="meta"))
        b = fake_device.to_fake_device(torch.empty(experts, hidden, ffn, dtype=dtype, device="meta"))
        offs = torch.tensor([4, 8, 12], dtype=torch.int32)
        return torch._grouped_mm(a, b, offs=offs)

    events, result = _trace(step)
    assert (result.shape, result.dtype) == (real.shape, real.dtype)
    assert ("alloc", real.untyped_storage().nbytes()) in events


@pytest.mark.parametrize("dims", [1, 2])
def test_convolutions_keep_the_memory_format_the_kernel_returns(dims):
    """A channels-last input gives a channels-last output on CPU (oneDNN), which the meta kernel
    leaves contiguous; ConvNeXt's permutes copy or not depending on it."""
    shape, kernel = ((2, 16, 12, 12), (16, 16, 3, 3)) if dims == 2 else ((2, 16, 12), (16, 16, 3))
    real_input = torch.randn(shape)
    if dims == 2:
        real_input = real_input.to(memory_format=torch.channels_last)
    real = torch.ops.aten.convolution(real_input, torch.randn(kernel), None, [1] * dims, [1] * dims, [1] * dims,
                                      False, [0] * dims, 1)

    def step():
        x = fake_device.to_fake_device(torch.empty_strided(shape, real_input.stride(), device="meta"))
        w = fake_device.to_fake_device(torch.empty(kernel, device="meta"))
        return torch.ops.aten.convolution(x, w, None, [1] * dims, [1] * dims, [1] * dims, False, [0] * dims, 1)

    _, result = _trace(step)
    assert result.stride() == real.stride()


def test_a_moe_loop_over_a_one_hot_routing_mask_is_sized_as_a_balanced_router():
    """Switch-Transformers-style expert loop: which tokens go to which expert is data, but a
    one-hot mask selects 1/n of its entries, and each expert's slice is taken to hold its share."""
    tokens, experts = 12, 4

    def step():
        logits = fake_device.to_fake_device(torch.empty(tokens, experts, device="meta"))
        mask = torch.nn.functional.one_hot(logits.argmax(-1), num_classes=experts)  # (tokens, experts)
        hit = (mask.sum(0) > 0).nonzero()  # unknown data: every expert hit (an upper bound)
        sizes = []
        for expert in hit:
            (chosen,) = torch.where(mask[:, expert[0]])
            sizes.append((int(expert[0]), tuple(chosen.shape)))
        return sizes

    events = []
    tracer = StorageTracer(lambda key, nbytes: events.append(nbytes), lambda key: None)
    with tracer:
        sizes = step()
    assert sizes == [(e, (tokens // experts,)) for e in range(experts)]
    assert any("balanced router" in note for note in tracer.notes)


def test_gradients_summed_by_autograd_reuse_the_buffer_as_the_real_engine_does():
    """Four slices of one tensor: autograd sums their gradients in the tensor's InputBuffer. The
    real engine adds in place (torch/csrc/autograd/input_buffer.cpp); on fake tensors it adds out
    of place, so the trace records the dying buffer's death before the sum's birth: at most two full-size
    gradients alive at once in backward, as a real CPU run measures (profiler: two 256000-byte
    blocks at most)."""
    import numpy as np

    from dpplan.planner.trace.recorder import Recorder as _Recorder

    recorder = _Recorder()
    tracer = StorageTracer(recorder.alloc, recorder.free)
    tracer.on_merge = recorder.merge
    with tracer:
        x = fake_device.to_fake_device(torch.empty(64, 1000, device="meta")).requires_grad_()
        loss = sum((x[:, i] * 2).sum() for i in range(4))
        start = len(recorder.event_storage)
        loss.backward()
    sizes = np.asarray(recorder.storage_bytes)
    events = np.asarray(recorder.event_storage[start:])
    signs = np.asarray(recorder.event_sign[start:])
    full = 64 * 1000 * 4
    blocks = np.cumsum(signs * (sizes[events] == full))
    assert blocks.max() == 2


@pytest.mark.parametrize("op", ["layer_norm", "log_softmax", "softmax"])
def test_backward_kernels_return_the_strides_the_device_returns(op):
    """A gradient that arrives transposed: the CPU kernels give the input's gradient contiguous
    strides, where the meta kernels follow the incoming gradient's (a later reshape then copies
    on the fake device only: Swin's final layer norm, a CTC head's log-softmax)."""

    def run(x):
        y = F.layer_norm(x, (x.shape[-1],)) if op == "layer_norm" else getattr(F, op)(x, dim=-1)
        return y.transpose(1, 2)  # the gradient reaching y is transposed

    real_x = torch.randn(2, 6, 5, requires_grad=True)
    real = {}
    real_x.register_hook(lambda grad: real.update(grad=grad.stride()))
    (run(real_x) * torch.randn(2, 5, 6)).sum().backward()

    traced = {}

    def step():
        x = fake_device.to_fake_device(torch.empty(2, 6, 5, device="meta")).requires_grad_()
        x.register_hook(lambda grad: traced.update(grad=grad.stride()))
        weight = fake_device.to_fake_device(torch.empty(2, 5, 6, device="meta"))
        (run(x) * weight).sum().backward()

    _trace(step)
    assert traced["grad"] == real["grad"] == (30, 5, 1)


def test_a_tied_weights_gradients_are_summed_out_of_place_as_the_real_engine_does():
    """A GPT head tied to its embedding: the head's weight gradient is a (transposed) view, so the
    real engine sums the two out of place (profiled on CPU: ``aten::add``, not ``add_``)."""
    import numpy as np

    from dpplan.planner.trace.recorder import Recorder as _Recorder

    recorder = _Recorder()
    tracer = StorageTracer(recorder.alloc, recorder.free)
    tracer.on_merge = recorder.merge
    vocab, hidden = 1000, 64
    with tracer:
        weight = fake_device.to_fake_device(torch.empty(vocab, hidden, device="meta")).requires_grad_()
        ids = fake_device.to_fake_device(torch.empty(4, 8, dtype=torch.long, device="meta"))
        loss = F.linear(F.embedding(ids, weight), weight).sum()
        start = len(recorder.event_storage)
        loss.backward()
    sizes = np.asarray(recorder.storage_bytes)
    events, signs = np.asarray(recorder.event_storage[start:]), np.asarray(recorder.event_sign[start:])
    blocks = np.cumsum(signs * (sizes[events] == vocab * hidden * 4))
    assert blocks.max() == 3  # both contributions and their sum
