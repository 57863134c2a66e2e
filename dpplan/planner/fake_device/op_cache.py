"""Speed for the tracer (planner/fake_device/storage_tracer.py): outputs of ops seen before with
the same metadata are made from a cache, and foreach ops run their kernel once per distinct
element. Neither changes what a trace records (tests/planner/test_trace_speed.py)."""

from __future__ import annotations

from typing import Any

import torch

from dpplan.planner.fake_device.fake_tensor import META
from dpplan.planner.fake_device.fake_tensor import unwrap as _unwrap

_Tensor = torch.Tensor


# -- op-output cache -----------------------------------------------------------------------
# Many meta kernels are Python (torch._refs / _prims); a 70B model runs each of them for 80
# identical layers and 700 parameters. Outputs of an op that creates fresh tensors depend only
# on the op and its inputs' metadata, so they are computed once per distinct call and then
# created directly. In-place ops only validate on the meta device: once validated for that
# metadata they are skipped. Ops that alias or reshape their inputs always run their kernel.

UNCACHED, FRESH_OUTPUTS, CHECK_ONLY = "uncached", "fresh", "check"
CHECK_ONLY_MARK = "validated"
OP_KIND: dict[Any, str] = {}
OP_CACHE: dict[tuple, Any] = {}
_METADATA_CHANGING = ("resize", "set_", "as_strided_", "_resize_output", "swap_tensors", "_coalesced_")


def op_kind(func) -> str:
    kind = OP_KIND.get(func)
    if kind is None:
        kind = _classify(func)
        OP_KIND[func] = kind
    return kind


def _classify(func) -> str:
    schema = func._schema
    name = schema.name.split("::")[-1]
    if torch.Tag.inplace_view in getattr(func, "tags", ()) or name.startswith(_METADATA_CHANGING):
        return UNCACHED
    if torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()) and not schema.is_mutable:
        return FRESH_OUTPUTS if _returns_fresh_tensors(schema) else UNCACHED
    args_alias = [a.alias_info for a in schema.arguments]
    returns_alias = [r.alias_info for r in schema.returns]
    if not any(args_alias) and not any(returns_alias):
        return FRESH_OUTPUTS if _returns_fresh_tensors(schema) else UNCACHED
    writes = [a for a in args_alias if a is not None and a.is_write]
    keyword_only = {a.name for a in schema.arguments if a.kwarg_only}
    if writes and all(r is None or r.is_write for r in returns_alias) and "out" not in keyword_only:
        # In-place (self or foreach lists): returns its mutated input, or nothing.
        if all(str(r.type) in ("Tensor",) for r in schema.returns) or not schema.returns:
            return CHECK_ONLY
    return UNCACHED


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


def shares_input_storage(args, result) -> bool:
    return bool(_storages_of(args, set()) & _storages_of(result, set()))


def _arg_key(value: Any):
    if isinstance(value, _Tensor):
        return (value.shape, value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return tuple(_arg_key(v) for v in value)
    if isinstance(value, float):
        return ("f", value)
    return value


def cache_key(func, args, kwargs, target):
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


def specs_of(result):
    if isinstance(result, (list, tuple)):
        return type(result), [specs_of(r) for r in result]
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


def outputs_from_specs(cached):
    container, specs = cached
    if container is None:
        return _output_from_spec(specs)
    return container(outputs_from_specs(s) for s in specs)


# -- foreach ops: one kernel call per distinct element ---------------------------------------
# A foreach op is its single-tensor op applied element by element (``_foreach_add_(xs, ys)``
# is ``x.add_(y)`` for each pair): the meta kernel checks, and for an out-of-place op shapes,
# element i from the i-th entries of the lists alone. The optimizer step calls them on all
# parameters at once (700 tensors of a 70B model, a handful of distinct shapes), and their meta
# kernels are Python loops (~0.5 ms per element). Running the kernel on the first element of
# each distinct combination checks exactly the same conditions; the outputs of the others are
# copies of that element's output.

NOT_DEDUPLICATED = object()


def run_foreach_deduplicated(func, args, kwargs, kind):
    """The op's result computed from its distinct elements, or ``NOT_DEDUPLICATED`` (not a
    foreach op, lists of unequal length, a tensor outside the lists, nothing repeated)."""
    schema = func._schema
    if kwargs or not schema.name.startswith("aten::_foreach_"):
        return NOT_DEDUPLICATED
    if kind is not CHECK_ONLY and (schema.is_mutable or any(r.alias_info for r in schema.returns)):
        return NOT_DEDUPLICATED  # neither in place nor fresh outputs
    lists = [i for i, a in enumerate(args) if isinstance(a, (list, tuple))]
    if not lists or any(isinstance(a, _Tensor) for a in args):
        return NOT_DEDUPLICATED
    length = len(args[lists[0]])
    if any(len(args[i]) != length for i in lists):
        return NOT_DEDUPLICATED
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
        return NOT_DEDUPLICATED
    if len(firsts) == length:
        return NOT_DEDUPLICATED
    reduced = list(args)
    for i in lists:
        reduced[i] = type(args[i])(args[i][j] for j in firsts)
    result = func(*_unwrap(reduced))
    if kind is CHECK_ONLY or result is None:
        return result
    if shares_input_storage(reduced, result):  # not the fresh outputs the schema promises
        return NOT_DEDUPLICATED
    specs = [_spec_of(r) for r in result]
    return type(result)(_output_from_spec(specs[u]) for u in element_of)
