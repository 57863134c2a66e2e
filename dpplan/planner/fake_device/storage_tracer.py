"""The tracer: runs a training step on fake-device tensors and reports storage births and deaths.

Every aten op of the step reaches ``StorageTracer.__torch_dispatch__``, runs only its meta
kernel on the meta tensors behind the fake-device tensors (fake_tensor.py), and the new
storages it creates, and the ones that die, are reported. Around that:
  - the meta kernel's outputs are corrected where the device's kernel differs
    (planner/meta_kernels.py), and on a CPU target a kernel's in-op buffers are measured
    (planner/cpu_kernels.py);
  - small tensors computed from constants keep their values (planner/known_values.py), and ops
    whose output size depends on data are sized from them or at a stated bound
    (planner/data_dependent.py);
  - outputs of ops seen before with the same metadata are made from a cache, and foreach ops
    run their kernel once per distinct element (speed: planner/fake_device/op_cache.py).

The private torch APIs this relies on are checked before a trace (planner/torch_apis.py).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# meta_kernels imports fake_tensor from this package: importing it by module, not by name,
# lets either be imported first.
from dpplan.planner import cpu_kernels, data_dependent, known_values, meta_kernels
from dpplan.planner.fake_device import collectives, op_cache
from dpplan.planner.fake_device.fake_tensor import (
    CPU,
    META,
    FakeDeviceError,
    FakeDeviceTensor,
)
from dpplan.planner.fake_device.fake_tensor import (
    PRIM_DEVICE as _PRIM_DEVICE,
)
from dpplan.planner.fake_device.fake_tensor import (
    meta_like as _meta_like,
)
from dpplan.planner.fake_device.fake_tensor import (
    unwrap as _unwrap,
)
from dpplan.planner.fake_device.torch_patches import current_graph_task_id

_Tensor = torch.Tensor
_LOCAL_SCALAR_DENSE = torch.ops.aten._local_scalar_dense.default
_ADD_TENSOR = torch.ops.aten.add.Tensor
_ADD_INPLACE = torch.ops.aten.add_.Tensor
_FAKE_MODE_KEY = torch._C._TorchDispatchModeKey.FAKE


def _torch_fake_mode():
    return torch._C._get_dispatch_mode(_FAKE_MODE_KEY)


def _pairs(meta_args: list, args: tuple):
    """(meta tensor, traced tensor) for every tensor argument, also inside lists."""
    for meta, arg in zip(meta_args, args):
        if isinstance(meta, (list, tuple)):
            yield from _pairs(list(meta), tuple(arg))
        elif isinstance(meta, _Tensor):
            yield meta, arg


def _is_real_device(device: Any) -> bool:
    return device is not None and torch.device(device).type != "meta"


class StorageTracer(TorchDispatchMode):
    """Runs every op on meta tensors and reports storage births and deaths.

    ``on_alloc(key, nbytes)`` is called for each new storage an op creates, ``on_free(key)``
    when that storage dies (all tensors viewing it gone). Storages that exist before the
    tracer starts are announced with ``adopt``.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode wraps a subclass's __torch_dispatch__ in torch._disable_dynamo
        # unless this says no; nothing here is ever compiled, and the wrapper costs several
        # microseconds on each of the ~75k dispatches of a 70B trace.
        return False

    def __init__(
        self,
        on_alloc: Callable[[int, int], None],
        on_free: Callable[[int], None],
        on_op_done: Callable[[Any, tuple, Any], None] | None = None,
        target_device_type: str = "cpu",
        trace_batch_size: int = 1,
        kernel_batch_size: int = 2,
    ):
        super().__init__()
        self.target_device_type = target_device_type
        """The device whose kernels the plan is for; meta kernels follow CUDA's output dtypes
        and allocate nothing inside an op, so for a CPU target a few ops are corrected and
        some measured (planner/cpu_kernels.py)."""
        self.trace_batch_size = trace_batch_size
        """The micro-batch the step is traced at (dims that are multiples of it carry the batch)."""
        self.kernel_batch_size = kernel_batch_size
        """The micro-batch at which CPU kernels' in-op buffers are measured."""
        self.on_merge: Callable[[int, int], bool] | None = None
        """``on_merge(new_key, old_key)``: storage ``old_key`` died holding what ``new_key``, just
        born, continues; the recorder records the death first (True if it did, and then the free
        is not reported again); see ``_note_accumulation``."""
        self._accumulation: tuple[int, tuple[int, ...]] | None = None
        self.on_sum_into: Callable[[int, int], None] | None = None
        """``on_sum_into(key, operand_key)``: during backward, storage ``operand_key`` was added
        in place into storage ``key``; how a gradient's later contributions are recorded
        (see ``_note_sum_into``)."""
        self.location: Callable[[], str] | None = None
        """Says where in the model the step is (the running module), for errors."""
        self.notes: dict[str, int] = {}
        self._writes: dict[Any, bool] = {}
        self._stale_values: set[int] = set()
        """Storages whose known values an in-place op with unknown inputs has overwritten."""
        """What could not be planned exactly, for the plan's notes: text -> number of calls."""
        self.on_op_done = on_op_done
        """Called as ``on_op_done(func, args, outputs)`` after each op, when set."""
        self.op_steps: Callable[[Any, tuple], list[tuple] | None] | None = None
        """``op_steps(func, args)``: buffers of the op's own beyond its outputs, as
        ``_replay_kernel``'s steps, or None (context parallelism's ring attention:
        planner/context_parallel.py)."""
        self._on_alloc = on_alloc
        self._on_free = on_free
        self._alive: dict[int, weakref.ref] = {}
        self._collective_buffers: dict[int, Any] = {}
        """Output storage key -> the gloo buffer its collective holds until it is waited for
        (planner/fake_device/collectives.py)."""
        self._returns_self: dict[Any, bool] = {}
        self.num_ops = 0
        self.current_op: Any = None
        """The aten op running now (for attributing a storage to the op that made it)."""

    # -- storages -------------------------------------------------------------------------
    def adopt(self, tensor: torch.Tensor) -> None:
        """Announce the storage of an existing tensor with ``on_alloc`` and track its death."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._alive:
            self._alive[key] = weakref.ref(storage, functools.partial(self._storage_died, key))
        self._on_alloc(key, storage.nbytes())

    def _storage_died(self, key: int, _ref: weakref.ref) -> None:
        """The weak reference's callback: ``key``'s storage is gone."""
        self._died(key)

    def _died(self, key: int) -> None:
        self._stale_values.discard(key)
        if self._alive.pop(key, None) is None:
            return
        pending = self._accumulation
        if pending is not None and key in pending[1] and self.on_merge is not None:
            self._accumulation = None
            if pending[0] in self._alive and self.on_merge(pending[0], key):
                return  # recorded as dying before the sum was born, as the engine's add_ leaves it
        self._on_free(key)

    def is_alive(self, key: int) -> bool:
        return key in self._alive

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, _Tensor) and type(value) is not FakeDeviceTensor:
            storage = value.untyped_storage()
            key = storage._cdata
            if key not in self._alive:
                self._alive[key] = weakref.ref(storage, functools.partial(self._storage_died, key))
                self._on_alloc(key, storage.nbytes())
            return FakeDeviceTensor(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._wrap(v) for v in value)
        return value

    def _replay_kernel(self, steps: list[tuple], result: Any) -> Any:
        """Wrap ``result`` while replaying the kernel's own buffers (planner/cpu_kernels.py):
        ``("+", name, nbytes)`` a buffer is born, ``("-", name)`` it dies, ``("out", i)`` output
        ``i`` (of a tuple result; 0 for a single tensor) is born. Outputs no step names are born
        first; every buffer is dead when the op returns."""
        single = not isinstance(result, (tuple, list))
        outputs = [result] if single else list(result)
        named = {step[1] for step in steps if step[0] == "out"}
        wrapped: list[Any] = [None] * len(outputs)
        for i, output in enumerate(outputs):
            if i not in named:
                wrapped[i] = self._wrap(output)
        buffers: dict[str, Any] = {}
        for step in steps:
            if step[0] == "+":
                if step[2]:
                    buffers[step[1]] = self._wrap(torch.empty(step[2], dtype=torch.uint8, device=META))
            elif step[0] == "-":
                buffers.pop(step[1], None)  # its storage dies here (nothing else holds it)
            elif step[1] < len(outputs):
                wrapped[step[1]] = self._wrap(outputs[step[1]])
        buffers.clear()
        return wrapped[0] if single else type(result)(wrapped)

    def _cpu_kernel_steps(self, func, args, kwargs, cache_key) -> list[tuple] | None:
        try:
            return cpu_kernels.in_op_steps(
                func, args, kwargs, self.trace_batch_size, cache_key, batch_size=self.kernel_batch_size
            )
        except cpu_kernels.ProbeSkipped as skipped:
            note = f"in-op buffers of {skipped} (planned without them)"
            self.notes[note] = self.notes.get(note, 0) + 1
            return None

    # -- ops ------------------------------------------------------------------------------
    def _mutates_and_returns_self(self, func) -> bool:
        known = self._returns_self.get(func)
        if known is None:
            schema = func._schema
            returns = schema.returns
            known = (
                len(returns) == 1
                and returns[0].alias_info is not None
                and returns[0].alias_info.is_write
            )
            self._returns_self[func] = known
        return known

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _PRIM_DEVICE:
            return CPU
        if _torch_fake_mode() is not None:
            # DTensor's sharding propagation computes output shapes under torch's own
            # FakeTensorMode (an infra mode, below this one): not an op of the step
            return func(*args, **(kwargs or {}))
        if any(t is not FakeDeviceTensor and t is not _Tensor for t in types):
            # a DTensor (tensor parallelism): it redistributes and runs the op on its local
            # shards, which come back here as fake-device tensors
            return NotImplemented
        if collectives.is_collective(func):
            if collectives.is_wait(func):
                collectives.release_on_wait(self._collective_buffers, args[0])
                return args[0]  # the device's wait returns the tensor the collective wrote
            if collectives.is_async_wrapper(func):
                # an AsyncCollectiveTensor around the collective's output: its storage, no new one
                return self._wrap(torch.ops.aten.alias.default(args[0].meta))
        if self._collective_buffers:
            # the first op on an AsyncCollectiveTensor waits for its collective, whose buffer
            # then dies (the wrapper the trace does without)
            for arg in args:
                if isinstance(arg, _Tensor):
                    collectives.release_on_wait(self._collective_buffers, arg)
        if func is _LOCAL_SCALAR_DENSE:
            # ``.item()``: the value when the trace knows it (planner/known_values.py), else a
            # placeholder: 1 keeps an optimizer's bias corrections finite.
            value = known_values.value_of(args[0], self._is_stale)
            return _placeholder_scalar(args[0].dtype) if known_values.is_unknown(value) else value.item()
        self.num_ops += 1
        self._accumulation = None  # a gradient sum is taken over only right after it is made
        if func is _ADD_INPLACE and self.on_sum_into is not None:
            self._note_sum_into(args, kwargs)  # before the op cache, which skips in-place ops
        self.current_op = func
        kwargs = kwargs or {}
        real_kwargs = kwargs
        if kwargs:
            if _is_real_device(kwargs.get("device")):
                kwargs = {**kwargs, "device": META}
            if "out" in kwargs:
                raise FakeDeviceError(f"out= variants are not traced: {func}")
            kwargs = dict(zip(kwargs, _unwrap(kwargs.values())))
        maybe_known = self._may_have_values(args)
        if data_dependent.needs_data(func, args):
            return self._data_dependent(func, args, kwargs, real_kwargs, maybe_known)
        in_place = self._writes_to_inputs(func)
        values = self._known_values(func, args, real_kwargs) if maybe_known and in_place else None
        kind = op_cache.op_kind(func)
        key = op_cache.cache_key(func, args, kwargs, self.target_device_type) if kind is not op_cache.UNCACHED else None
        cached = op_cache.OP_CACHE.get(key) if key is not None else None
        if cached is not None:
            if kind is op_cache.CHECK_ONLY:
                return args[0] if self._mutates_and_returns_self(func) else None
            result = op_cache.outputs_from_specs(cached)
        else:
            result = op_cache.run_foreach_deduplicated(func, args, kwargs, kind)
            if result is op_cache.NOT_DEDUPLICATED:
                result = meta_kernels.run_meta_kernel(func, args, _unwrap(args), kwargs)
            if self.target_device_type == "cpu" and func in cpu_kernels.CORRECTED_OPS:
                result = cpu_kernels.corrected_outputs(func, args, result)
            if key is not None:
                if kind is op_cache.FRESH_OUTPUTS and op_cache.shares_input_storage(args, result):
                    # The schema promises fresh outputs but the kernel returned a view
                    # (``_unsafe_view`` does): never replay this op from the cache.
                    op_cache.OP_KIND[func] = op_cache.UNCACHED
                else:
                    checked_only = kind is op_cache.CHECK_ONLY
                    op_cache.OP_CACHE[key] = op_cache.CHECK_ONLY_MARK if checked_only else op_cache.specs_of(result)
        if self._mutates_and_returns_self(func):
            return args[0]  # its value, if any, was updated in place
        if kind is op_cache.CHECK_ONLY:
            return result
        if maybe_known and not in_place and known_values.small_enough(result):
            values = self._known_values(func, args, real_kwargs)
        steps = None
        if self.target_device_type == "cpu" and cpu_kernels.needs_probe(func, args):
            steps = self._cpu_kernel_steps(func, args, kwargs, key)
        elif self.target_device_type == "cpu" and func in cpu_kernels.RULED_OPS:
            steps = cpu_kernels.RULED_OPS[func](args)
        if steps is None and self.op_steps is not None:
            steps = self.op_steps(func, args)
        gloo_collective = self.target_device_type == "cpu" and collectives.is_collective(func)
        if gloo_collective and steps is None:
            steps = collectives.gloo_steps(func, args)
        wrapped = self._replay_kernel(steps, result) if steps else self._wrap(result)
        if gloo_collective and collectives.waits_with_buffer(func):
            self._collective_buffers[wrapped.untyped_storage()._cdata] = self._wrap(collectives.buffer_until_wait(args))
        if func is _ADD_TENSOR:
            self._note_accumulation(args, kwargs, wrapped)
        known_values.attach(wrapped, values)
        data_dependent.pass_on_mask_share(func, args, wrapped)
        if maybe_known:
            self._mark_one_hot(func, args, wrapped)
        if self.on_op_done is not None:
            self.on_op_done(func, args, wrapped)
        return wrapped

    def _note_accumulation(self, args: tuple, kwargs: dict, output: Any) -> None:
        """Autograd sums the gradients that reach one input in its InputBuffer
        (torch/csrc/autograd/input_buffer.cpp ``accumulate``): in place (``old.add_(new)``) when
        it holds the last reference to a dense plain tensor, else ``old + new``. A tensor subclass
        is never summed in place, so the fake device sees ``old + new``; when the old sum, no
        view, dies right after, the real engine would have summed into it (profiled on CPU: a
        residual stream's and Mamba's sums are ``aten::add_``, a tied head's ``aten::add``). ``_died`` then records its death
        before the sum's birth: never the two alive together."""
        if current_graph_task_id() == -1 or kwargs.get("alpha", 1) != 1 or len(args) != 2:
            return
        a, b = args
        if not (isinstance(a, _Tensor) and isinstance(b, _Tensor) and isinstance(output, _Tensor)):
            return
        if a.shape != b.shape or a.dtype != b.dtype or output.shape != a.shape or output.dtype != a.dtype:
            return
        if not (a.is_contiguous() and output.is_contiguous()) or a._is_view():
            # the buffer's tensor must be its storage's only user: a view (the transposed product
            # a tied GPT head's weight gradient is) is summed out of place, as profiled on CPU
            return
        self._accumulation = (output.untyped_storage()._cdata, (a.untyped_storage()._cdata,))

    def _note_sum_into(self, args: tuple, kwargs: dict | None) -> None:
        """AccumulateGrad sums a gradient that reaches a leaf with a ``.grad`` already (a later
        micro-batch's) in place, ``variable_grad += new_grad``, when grad mode is off, as it is
        in backward (torch/csrc/autograd/functions/accumulate_grad.h ``accumulateGrad``),
        and then runs the parameter's post-accumulate-grad hooks: report which storage was
        summed into which, for the hook to read."""
        on_sum_into = self.on_sum_into
        if on_sum_into is None or current_graph_task_id() == -1 or (kwargs or {}).get("alpha", 1) != 1 or len(args) != 2:
            return
        a, b = args
        if isinstance(a, _Tensor) and isinstance(b, _Tensor):
            on_sum_into(a.untyped_storage()._cdata, b.untyped_storage()._cdata)

    # -- values the trace knows -------------------------------------------------------------
    def _is_stale(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage()._cdata in self._stale_values

    def _may_have_values(self, args: tuple) -> bool:
        """False for the common op, on activations or parameters, none of which has a value."""
        tensors = 0
        for value in args:
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, _Tensor):
                if type(value) is not FakeDeviceTensor or "known_value" in value.__dict__:
                    return True
                tensors += 1
        return not tensors  # a factory

    def _writes_to_inputs(self, func) -> bool:
        known = self._writes.get(func)
        if known is None:
            known = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
            self._writes[func] = known
        return known

    def _known_values(self, func, args: tuple, kwargs: dict) -> Any:
        """The op run on the known values of its inputs (planner/known_values.py), or None.
        An in-place op on a tensor with a value, from inputs without one, makes the value of
        everything sharing its storage unknown."""
        values = known_values.run_on_values(func, args, kwargs, self._is_stale)
        if not known_values.is_unknown(values):
            return values
        for argument, value in zip(func._schema.arguments, args):
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, _Tensor):
                self._stale_values.add(value.untyped_storage()._cdata)
        return None

    def _mark_one_hot(self, func, args: tuple, wrapped: Any) -> None:
        """``one_hot(x, n)`` reaches the tracer as ``x.unsqueeze(-1) == arange(n)`` (its meta path,
        aten/src/ATen/native/Onehot.cpp): a comparison with n distinct known values along a dim
        where the other side has one entry sets at most one in n."""
        if func is not data_dependent.EQ_TENSOR or not isinstance(wrapped, _Tensor):
            return
        for classes, other in ((args[1], args[0]), (args[0], args[1])):
            if not isinstance(classes, _Tensor) or not isinstance(other, _Tensor):
                continue
            value = known_values.value_of(classes, self._is_stale)
            if known_values.is_unknown(value) or value.dim() == 0 or value.dim() > other.dim():
                continue
            n = value.shape[-1]
            if n > 1 and value.numel() == n and other.shape[-1] == 1 and value.unique().numel() == n:
                wrapped.mask_share = 1.0 / n  # type: ignore[attr-defined]  # read back with getattr
                return

    def _data_dependent(self, func, args: tuple, kwargs: dict, real_kwargs: dict, maybe_known: bool) -> Any:
        """An op whose output size depends on data (planner/data_dependent.py): sized from the
        values of its masks when the trace knows them, else from a one-hot mask's share, else at
        its upper bound (with a note)."""
        values = self._known_values(func, args, real_kwargs) if maybe_known else None
        meta_args = _unwrap(args)
        masks = {id(m): a for m, a in _pairs(meta_args, args)}

        def known(meta: torch.Tensor) -> Any:
            """A mask's value, else its expected share of selected entries, else None."""
            traced = masks.get(id(meta))
            if traced is None:
                return None
            value = known_values.value_of(traced, self._is_stale)
            return getattr(traced, "mask_share", None) if known_values.is_unknown(value) else value

        if func in data_dependent.UPPER_BOUNDS:
            result, how = data_dependent.sized(func, meta_args, kwargs, known, self.trace_batch_size)
            if how == data_dependent.BALANCED:
                note = f"{func} sized as a balanced router selects (each expert an even share of the tokens)"
                self.notes[note] = self.notes.get(note, 0) + 1
            elif how == data_dependent.UPPER_BOUND:
                note = f"{func} sized as if its mask selected everything (an upper bound: its data is unknown)"
                self.notes[note] = self.notes.get(note, 0) + 1
                values = values if values is not None else data_dependent.bound_values(func, meta_args)
        elif values is not None:
            result = _meta_like(values)
        else:
            try:
                result = func(*meta_args, **kwargs)  # a meta kernel that can (one_hot with classes)
            except Exception:
                error = data_dependent.UnboundedOp(f"{func} returns as many elements as its data says")
                error.op, error.where = str(func), self.location() if self.location is not None else ""
                raise error from None
        steps = None
        if self.target_device_type == "cpu":
            steps = data_dependent.mask_index_steps(func, args, meta_args, known, self.trace_batch_size)
        if self._mutates_and_returns_self(func):
            if steps:
                self._replay_kernel(steps, [])
            return args[0]
        wrapped = self._replay_kernel(steps, result) if steps else self._wrap(result)
        known_values.attach(wrapped, values)
        if self.on_op_done is not None:
            self.on_op_done(func, args, wrapped)
        return wrapped



def _placeholder_scalar(dtype: torch.dtype):
    if dtype == torch.bool:
        return False
    if dtype.is_floating_point or dtype.is_complex:
        return 1.0
    return 1
