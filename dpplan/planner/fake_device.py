"""The tracer: runs a training step on fake-device tensors and reports storage births and deaths.

Every aten op of the step reaches ``StorageTracer.__torch_dispatch__``, runs only its meta
kernel on the meta tensors behind the fake-device tensors (planner/fake_tensor.py), and the new
storages it creates, and the ones that die, are reported. Around that:
  - the meta kernel's outputs are corrected where the device's kernel differs
    (planner/meta_kernels.py), and on a CPU target a kernel's in-op buffers are measured
    (planner/cpu_kernels.py);
  - small tensors computed from constants keep their values (planner/known_values.py), and ops
    whose output size depends on data are sized from them or at a stated bound
    (planner/data_dependent.py);
  - outputs of ops seen before with the same metadata are made from a cache, and foreach ops
    run their kernel once per distinct element (speed).

The private torch APIs this relies on are checked before a trace (planner/torch_apis.py).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpplan.planner import cpu_kernels, data_dependent, known_values
from dpplan.planner.fake_tensor import (  # noqa: F401 (the tracer's tensors, re-exported)
    CPU,
    META,
    PRIM_DEVICE as _PRIM_DEVICE,
    FakeDeviceError,
    FakeDeviceTensor,
    meta_like as _meta_like,
    module_to_fake_device,
    to_fake_device,
    tree_to_fake_device,
    unwrap as _unwrap,
)
from dpplan.planner.meta_kernels import run_meta_kernel

_Tensor = torch.Tensor
_LOCAL_SCALAR_DENSE = torch.ops.aten._local_scalar_dense.default
_ADD_TENSOR = torch.ops.aten.add.Tensor


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
        self.location: Callable[[], str] | None = None
        """Says where in the model the step is (the running module), for errors."""
        self.notes: dict[str, int] = {}
        self._writes: dict[Any, bool] = {}
        self._stale_values: set[int] = set()
        """Storages whose known values an in-place op with unknown inputs has overwritten."""
        """What could not be planned exactly, for the plan's notes: text -> number of calls."""
        self.on_op_done = on_op_done
        """Called as ``on_op_done(func, args, outputs)`` after each op, when set."""
        self._on_alloc = on_alloc
        self._on_free = on_free
        self._alive: dict[int, weakref.ref] = {}
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
            self._alive[key] = weakref.ref(storage, lambda _ref, key=key: self._died(key))
        self._on_alloc(key, storage.nbytes())

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
                self._alive[key] = weakref.ref(storage, lambda _ref, key=key: self._died(key))
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
        if func is _LOCAL_SCALAR_DENSE:
            # ``.item()``: the value when the trace knows it (planner/known_values.py), else a
            # placeholder: 1 keeps an optimizer's bias corrections finite.
            value = known_values.value_of(args[0], self._is_stale)
            return _placeholder_scalar(args[0].dtype) if known_values.is_unknown(value) else value.item()
        self.num_ops += 1
        self._accumulation = None  # a gradient sum is taken over only right after it is made
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
        kind = _op_kind(func)
        key = _cache_key(func, args, kwargs, self.target_device_type) if kind is not _UNCACHED else None
        cached = _OP_CACHE.get(key) if key is not None else None
        if cached is not None:
            if kind is _CHECK_ONLY:
                return args[0] if self._mutates_and_returns_self(func) else None
            result = _outputs_from_specs(cached)
        else:
            result = _run_foreach_deduplicated(func, args, kwargs, kind)
            if result is _NOT_DEDUPLICATED:
                result = run_meta_kernel(func, args, _unwrap(args), kwargs)
            if self.target_device_type == "cpu" and func in cpu_kernels.CORRECTED_OPS:
                result = cpu_kernels.corrected_outputs(func, args, result)
            if key is not None:
                if kind is _FRESH_OUTPUTS and _shares_input_storage(args, result):
                    # The schema promises fresh outputs but the kernel returned a view
                    # (``_unsafe_view`` does): never replay this op from the cache.
                    _OP_KIND[func] = _UNCACHED
                else:
                    _OP_CACHE[key] = _CHECK_ONLY_MARK if kind is _CHECK_ONLY else _specs_of(result)
        if self._mutates_and_returns_self(func):
            return args[0]  # its value, if any, was updated in place
        if kind is _CHECK_ONLY:
            return result
        if maybe_known and not in_place and known_values.small_enough(result):
            values = self._known_values(func, args, real_kwargs)
        steps = None
        if self.target_device_type == "cpu" and cpu_kernels.needs_probe(func, args):
            steps = self._cpu_kernel_steps(func, args, kwargs, key)
        elif self.target_device_type == "cpu" and func in cpu_kernels.RULED_OPS:
            steps = cpu_kernels.RULED_OPS[func](args)
        wrapped = self._replay_kernel(steps, result) if steps else self._wrap(result)
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
                wrapped.mask_share = 1.0 / n
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


# -- op-output cache ------------------------------------------------------------------------
# Many meta kernels are Python (torch._refs / _prims); a 70B model runs each of them for 80
# identical layers and 700 parameters. Outputs of an op that creates fresh tensors depend only
# on the op and its inputs' metadata, so they are computed once per distinct call and then
# created directly. In-place ops only validate on the meta device: once validated for that
# metadata they are skipped. Ops that alias or reshape their inputs always run their kernel.

_UNCACHED, _FRESH_OUTPUTS, _CHECK_ONLY = "uncached", "fresh", "check"
_CHECK_ONLY_MARK = "validated"
_OP_KIND: dict[Any, str] = {}
_OP_CACHE: dict[tuple, Any] = {}
_METADATA_CHANGING = ("resize", "set_", "as_strided_", "_resize_output", "swap_tensors", "_coalesced_")


def _op_kind(func) -> str:
    kind = _OP_KIND.get(func)
    if kind is None:
        kind = _classify(func)
        _OP_KIND[func] = kind
    return kind


def _classify(func) -> str:
    schema = func._schema
    name = schema.name.split("::")[-1]
    if torch.Tag.inplace_view in getattr(func, "tags", ()) or name.startswith(_METADATA_CHANGING):
        return _UNCACHED
    if torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()) and not schema.is_mutable:
        return _FRESH_OUTPUTS if _returns_fresh_tensors(schema) else _UNCACHED
    args_alias = [a.alias_info for a in schema.arguments]
    returns_alias = [r.alias_info for r in schema.returns]
    if not any(args_alias) and not any(returns_alias):
        return _FRESH_OUTPUTS if _returns_fresh_tensors(schema) else _UNCACHED
    writes = [a for a in args_alias if a is not None and a.is_write]
    if writes and all(r is None or r.is_write for r in returns_alias) and "out" not in {a.name for a in schema.arguments if a.kwarg_only}:
        # In-place (self or foreach lists): returns its mutated input, or nothing.
        if all(str(r.type) in ("Tensor",) for r in schema.returns) or not schema.returns:
            return _CHECK_ONLY
    return _UNCACHED


def _returns_fresh_tensors(schema) -> bool:
    return bool(schema.returns) and all(str(r.type) in ("Tensor", "Tensor?", "Tensor[]") for r in schema.returns)


def _storages_of(value: Any, found: set) -> set:
    if isinstance(value, _Tensor):
        found.add(_storage_cdata(value))
    elif isinstance(value, (list, tuple)):
        for v in value:
            _storages_of(v, found)
    return found


def _storage_cdata(tensor) -> int:
    return tensor.untyped_storage()._cdata


def _shares_input_storage(args, result) -> bool:
    return bool(_storages_of(args, set()) & _storages_of(result, set()))


def _arg_key(value: Any):
    if isinstance(value, _Tensor):
        return (value.shape, value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return tuple(_arg_key(v) for v in value)
    if isinstance(value, float):
        return ("f", value)
    return value


def _cache_key(func, args, kwargs, target):
    try:
        key = (target, func, _arg_key(args), tuple((k, _arg_key(v)) for k, v in kwargs.items()))
        hash(key)
    except TypeError:
        return None
    return key


def _spec_of(tensor):
    if tensor is None:
        return None
    return (
        tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.storage_offset(), tensor.untyped_storage().nbytes()
    )


def _specs_of(result):
    if isinstance(result, (list, tuple)):
        return type(result), [_specs_of(r) for r in result]
    return None, _spec_of(result)


def _output_from_spec(spec):
    if spec is None:
        return None
    shape, stride, dtype, offset, nbytes = spec
    tensor = torch.empty_strided(shape, stride, dtype=dtype, device=META)
    if offset or tensor.untyped_storage().nbytes() != nbytes:
        storage = torch.UntypedStorage(nbytes, device=META)
        tensor = torch.empty(0, dtype=dtype, device=META).set_(storage, offset, shape, stride)
    return tensor


def _outputs_from_specs(cached):
    container, specs = cached
    if container is None:
        return _output_from_spec(specs)
    return container(_outputs_from_specs(s) for s in specs)


# -- foreach ops: one kernel call per distinct element ---------------------------------------
# A foreach op is its single-tensor op applied element by element (``_foreach_add_(xs, ys)``
# is ``x.add_(y)`` for each pair): the meta kernel checks, and for an out-of-place op shapes,
# element i from the i-th entries of the lists alone. The optimizer step calls them on all
# parameters at once (700 tensors of a 70B model, a handful of distinct shapes), and their meta
# kernels are Python loops (~0.5 ms per element). Running the kernel on the first element of
# each distinct combination checks exactly the same conditions; the outputs of the others are
# copies of that element's output.

_NOT_DEDUPLICATED = object()


def _run_foreach_deduplicated(func, args, kwargs, kind):
    """The op's result computed from its distinct elements, or ``_NOT_DEDUPLICATED`` (not a
    foreach op, lists of unequal length, a tensor outside the lists, nothing repeated)."""
    schema = func._schema
    if kwargs or not schema.name.startswith("aten::_foreach_"):
        return _NOT_DEDUPLICATED
    if kind is not _CHECK_ONLY and (schema.is_mutable or any(r.alias_info for r in schema.returns)):
        return _NOT_DEDUPLICATED  # neither in place nor fresh outputs
    lists = [i for i, a in enumerate(args) if isinstance(a, (list, tuple))]
    if not lists or any(isinstance(a, _Tensor) for a in args):
        return _NOT_DEDUPLICATED
    length = len(args[lists[0]])
    if any(len(args[i]) != length for i in lists):
        return _NOT_DEDUPLICATED
    distinct: dict[tuple, int] = {}  # element key -> its number, in first-seen order
    firsts: list[int] = []  # per number: the first element with that key
    element_of: list[int] = []  # per element: its key's number
    try:
        for j in range(length):
            number = distinct.setdefault(tuple(_arg_key(args[i][j]) for i in lists), len(distinct))
            if number == len(firsts):
                firsts.append(j)
            element_of.append(number)
    except TypeError:  # an unhashable element
        return _NOT_DEDUPLICATED
    if len(firsts) == length:
        return _NOT_DEDUPLICATED
    reduced = list(args)
    for i in lists:
        reduced[i] = type(args[i])(args[i][j] for j in firsts)
    result = func(*_unwrap(reduced))
    if kind is _CHECK_ONLY or result is None:
        return result
    if _shares_input_storage(reduced, result):  # not the fresh outputs the schema promises
        return _NOT_DEDUPLICATED
    specs = [_spec_of(r) for r in result]
    return type(result)(_output_from_spec(specs[u]) for u in element_of)


def _placeholder_scalar(dtype: torch.dtype):
    if dtype == torch.bool:
        return False
    if dtype.is_floating_point or dtype.is_complex:
        return 1.0
    return 1


def always_stepping(grad_scaler):
    """A GradScaler that steps the optimizer without reading ``found_inf``.

    On the fake device ``found_inf`` has no value; a real fp16 run steps on all but the rare
    overflowing iterations, and those are what the plan is about. ``_maybe_opt_step`` is the
    private hook of ``torch.amp.GradScaler`` that makes that decision.
    """

    def step_unconditionally(optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)

    grad_scaler._maybe_opt_step = step_unconditionally
    return grad_scaler


@contextlib.contextmanager
def skip_weight_init():
    """Turn ``torch.nn.init``'s in-place initialisers into no-ops while a meta model is built.

    On the meta device they compute nothing but still cost about a second for a 70B model.
    """
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {name: getattr(init, name) for name in names}

    def keep(tensor, *args, **kwargs):
        return tensor

    for name in names:
        setattr(init, name, keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


@contextlib.contextmanager
def host_rng_state_as_traced_tensor():
    """Make ``torch.get_rng_state()`` return a traced tensor of the real state's size.

    Checkpointing (``preserve_rng_state=True``) keeps the CPU generator's state per
    checkpointed region from forward until its backward, and ``torch.random.fork_rng`` takes
    one more copy while a region is recomputed (torch/utils/checkpoint.py). The real call
    creates its tensor outside the dispatcher, so the tracer would not see it; on a CPU
    target those bytes are part of the measured peak. ``torch.set_rng_state`` with such a
    tensor does nothing (there is no data to restore)."""
    real_get, real_set = torch.get_rng_state, torch.set_rng_state
    state_bytes = real_get().numel()

    def traced_get_rng_state():
        return torch.empty(state_bytes, dtype=torch.uint8, device=META)

    def traced_set_rng_state(state):
        if state.device.type == "meta" or isinstance(state, FakeDeviceTensor):
            return None
        return real_set(state)

    torch.get_rng_state, torch.set_rng_state = traced_get_rng_state, traced_set_rng_state
    try:
        yield
    finally:
        torch.get_rng_state, torch.set_rng_state = real_get, real_set


def current_graph_task_id() -> int:
    """-1 outside backward; used to tell a recomputed forward (checkpointing) from a real one."""
    return torch._C._current_graph_task_id()
