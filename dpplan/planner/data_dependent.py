"""Ops whose output size depends on data, planned where the data is unknown: at an upper bound.

``nonzero``, ``masked_select`` and boolean indexing return as many elements as a mask has true
entries; no meta kernel can size them (torch raises "no fake impl or Meta kernel"). Where the
mask's values are known (planner/known_values.py: computed from constants) the tracer runs the op
on them and is exact. Where they are not (a mask computed from the labels or the activations),
the op is planned as if every entry were true: the most the op can allocate, and exact for the
common case of a mask that selects all (CTC targets without padding). One kind of mask is known
better: one built by ``one_hot`` (MoE routing: which expert each token goes to) selects
``1 / num_classes`` of its entries on average, and the slices a MoE loop takes of it (one
expert's tokens) are assumed to select evenly, as a balanced router does. The plan says which
assumption it made in a note naming the op. An op that has no upper bound (``repeat_interleave`` without
``output_size``, ``bincount``) is an error naming the op and its module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dpplan.errors import UsageError

aten = torch.ops.aten
META = torch.device("meta")


class UnboundedOp(UsageError):
    """A data-dependent op whose output size has no bound without the data."""

    op: str = ""
    where: str = ""
    """The module running it (set by the tracer)."""


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _selected(mask: torch.Tensor, info: Any, batch: int = 1) -> int:
    """How many entries the mask selects: counted from its value (a tensor), from its expected
    share of selected entries (a float: a one-hot routing mask), else all of them. A mask that
    holds the trace's prime batch selects a whole number of entries per sample (the count is
    rounded to a multiple of the batch), so the sizes that follow scale with the batch."""
    if isinstance(info, torch.Tensor):
        count = int(info.count_nonzero())
    elif isinstance(info, float):
        count = round(mask.numel() * info)
    else:
        return mask.numel()
    if batch > 1 and mask.numel() % batch == 0 and count % batch:
        count = round(count / batch) * batch
    return count


def _mask_as_indices(mask: torch.Tensor, info: Any, batch: int) -> list[torch.Tensor]:
    """Long indices of the entries the mask selects (one per mask dim), as meta tensors."""
    count = _selected(mask, info, batch)
    return [torch.empty(count, dtype=torch.long, device=META) for _ in range(mask.dim())]


def _nonzero(x, *, known, batch=1):
    return torch.empty(_selected(x, known(x), batch), x.dim(), dtype=torch.long, device=META)


def _masked_select(x, mask, *, known, batch=1):
    shape = torch.broadcast_shapes(x.shape, mask.shape)
    info = known(mask)
    broadcast = torch.empty(shape, dtype=torch.bool, device=META)
    if isinstance(info, torch.Tensor):
        info = info.expand(shape)
    return torch.empty(_selected(broadcast, info, batch), dtype=x.dtype, device=META)


def _index(x, indices, *, known, batch=1):
    expanded: list = []
    for index in indices:
        expanded += _mask_as_indices(index, known(index), batch) if _is_mask(index) else [index]
    return aten.index.Tensor(x, expanded)


def _index_put(x, indices, values, accumulate=False, *, known, batch=1):
    return x  # in place: the same storage, whatever the mask selects


def _unique2(x, sorted=True, return_inverse=False, return_counts=False, *, known=None, batch=1):
    n = x.numel()
    return (
        torch.empty(n, dtype=x.dtype, device=META),
        torch.empty(x.shape if return_inverse else 0, dtype=torch.long, device=META),
        torch.empty(n if return_counts else 0, dtype=torch.long, device=META),
    )


def _unique_consecutive(x, return_inverse=False, return_counts=False, dim=None, *, known=None, batch=1):
    return _unique2(x, True, return_inverse, return_counts)


def _ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, zero_infinity=False, *, known=None, batch=1):
    """``log_alpha`` is (batch, time, 2 * longest target + 1) (aten/src/ATen/native/LossCTC.cpp
    ``ctc_loss_cpu_template``). The longest target is the padded targets' width (2-D targets: an
    upper bound, exact without padding); for targets concatenated into one dim (Hugging Face's
    CTC loss) it is taken as their mean length, exact when all are as long (no padding in the
    labels), and never longer than the input's time, which CTC needs."""
    time, samples = log_probs.shape[0], log_probs.shape[1] if log_probs.dim() == 3 else 1
    longest = targets.shape[1] if targets.dim() == 2 else min(-(-targets.numel() // samples), time)
    return (
        torch.empty(samples, dtype=log_probs.dtype, device=META),
        torch.empty(samples, time, 2 * longest + 1, dtype=log_probs.dtype, device=META),
    )


UPPER_BOUNDS: dict[Any, Callable[..., Any]] = {
    aten._ctc_loss.Tensor: _ctc_loss,
    aten.nonzero.default: _nonzero,
    aten.masked_select.default: _masked_select,
    aten.index.Tensor: _index,
    aten.index_put_.default: _index_put,
    aten.index_put.default: lambda x, indices, values, accumulate=False, **_: torch.empty_like(x),
    aten._unique2.default: _unique2,
    aten.unique_consecutive.default: _unique_consecutive,
}
"""Per op: its outputs (meta tensors), from the masks' values where known, else as if every
entry counted."""


def needs_data(func, args: tuple) -> bool:
    """Whether the meta kernel cannot size this call (indexing only with a mask)."""
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return any(_is_mask(i) for i in args[1])
    return func in UPPER_BOUNDS or torch.Tag.dynamic_output_shape in func.tags


def bound_values(func, meta_args: list) -> Any:
    """The values an upper bound implies, where it implies any: ``nonzero`` of a mask that selects
    everything returns every coordinate in order, so a loop over its rows (Hugging Face's eager
    MoE loops over the experts hit) visits each one."""
    if func is aten.nonzero.default and meta_args[0].numel() <= BOUND_VALUES_MAX_ELEMENTS:
        return torch.ones(meta_args[0].shape, dtype=torch.bool).nonzero()
    return None


BOUND_VALUES_MAX_ELEMENTS = 1 << 16


def indexes_with_mask(func, args: tuple) -> bool:
    return func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
        _is_mask(i) for i in args[1]
    )


def mask_index_steps(func, args: tuple, meta_args: list, known, batch: int = 1) -> list[tuple] | None:
    """Indexing with a mask on CPU first turns the mask into long indices, one int64 per selected
    entry and mask dim (aten/src/ATen/native/TensorAdvancedIndexing.cpp ``expandTensors`` calls
    ``nonzero``), alive while the op runs: replay steps for the tracer (None: no mask)."""
    if func not in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return None
    nbytes = 0
    for meta in meta_args[1]:
        if _is_mask(meta):
            nbytes += _selected(meta, known(meta), batch) * meta.dim() * 8
    if not nbytes:
        return None
    steps: list[tuple] = [("+", "indices", nbytes)]
    if func is not aten.index_put_.default:
        steps.append(("out", 0))
    return steps + [("-", "indices")]


EXACT, BALANCED, UPPER_BOUND = "exact", "balanced", "upper bound"


def sized(func, meta_args: list, kwargs: dict, known, batch: int = 1) -> tuple[Any, str]:
    """The op's outputs (meta tensors) and how they were sized: EXACT from the masks' values,
    BALANCED from one-hot routing masks assumed to select evenly, else their UPPER_BOUND.
    ``known(mask)`` gives a mask's value (a tensor), its expected share of selected entries
    (a float), or None."""
    rule = UPPER_BOUNDS.get(func)
    if rule is None:
        error = UnboundedOp(f"{func} returns as many elements as its data says, which is unknown while planning")
        error.op = str(func)
        raise error
    listed = [i for a in meta_args if isinstance(a, (list, tuple)) for i in a]
    masks = [a for a in meta_args if _is_mask(a)] + [i for i in listed if _is_mask(i)]
    if func is aten.nonzero.default:
        masks = [meta_args[0]]
    infos = [known(m) for m in masks]
    if masks and all(isinstance(i, torch.Tensor) for i in infos):
        how = EXACT
    elif masks and all(i is not None for i in infos):
        how = BALANCED
    else:
        how = UPPER_BOUND
    return rule(*meta_args, **kwargs, known=known, batch=batch), how


# -- one-hot routing masks ---------------------------------------------------------------------
# One-hot masks (MoE routing): ``one_hot(x, n)`` has 1/n of its entries set (it reaches the tracer
# as a comparison with an arange: ``mark_one_hot``); views, copies and
# selections of it (one expert's slice) are taken to keep that share, as a balanced router's
# would (planner/data_dependent.py uses it to size ``nonzero`` and boolean indexing of them).
_KEEPS_MASK_SHARE = frozenset({
    torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.index.Tensor,
    torch.ops.aten.ne.Scalar, torch.ops.aten.gt.Scalar, torch.ops.aten.eq.Scalar,
})


EQ_TENSOR = torch.ops.aten.eq.Tensor
_AT_MOST_MASK_SHARE = frozenset({
    torch.ops.aten.mul.Tensor, torch.ops.aten.logical_and.default, torch.ops.aten.bitwise_and.Tensor,
})


def pass_on_mask_share(func, args: tuple, wrapped: Any) -> None:
    if func in _AT_MOST_MASK_SHARE:  # zeros stay zeros: at most the one-hot's entries are set
        found = [getattr(a, "mask_share", None) for a in args[:2] if isinstance(a, torch.Tensor)]
        shares: list[float] = [x for x in found if x is not None]
        if shares and isinstance(wrapped, torch.Tensor):
            wrapped.mask_share = min(shares)  # type: ignore[attr-defined]  # read back with getattr
        return
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    share = getattr(source, "mask_share", None) if source is not None else None
    if share is None:
        return
    is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
    if is_view or func in _KEEPS_MASK_SHARE:
        for output in wrapped if isinstance(wrapped, (list, tuple)) else [wrapped]:
            if isinstance(output, torch.Tensor):
                output.mask_share = share  # type: ignore[attr-defined]  # read back with getattr
