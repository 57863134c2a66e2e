"""FSDP1's flat parameters: each unit's (and the root's) parameters laid out in one flat tensor
as torch/distributed/fsdp/_flat_param.py does, and which part of it a shard rank holds. Read by
the strategy (planner/strategies/fsdp1.py) and the replay of its hooks (fsdp1_replay.py)."""

from __future__ import annotations

from dataclasses import dataclass

from dpplan.planner.strategies.layout import Layout
from dpplan.planner.trace import PARAM_CAST, StepTrace, cached_on_trace

SHARDED = ("fsdp-full", "fsdp-grad-op", "fsdp-hybrid")
ALIGNMENT_BYTES = 16
"""_flat_param.py ``_get_aligned_numel``: each original parameter starts 16-byte aligned in the
flat parameter when use_orig_params=True."""
FP32_BYTES = 4


@dataclass(frozen=True, kw_only=True)
class FlatParam:
    """One unit's flat parameter as ``FlatParamHandle._init_flat_param_and_metadata`` lays it
    out: parameters in module order, each aligned, the total padded to the group size."""

    unit: int
    params: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int
    group_size: int
    sharded: bool
    compute_itemsize: int
    """Bytes per element in forward and backward (the mixed-precision param dtype)."""
    param_itemsize: int
    """Bytes per element of the sharded parameter, its gradient and the optimizer's view."""
    zero_fill_numel: int
    """Padding and parameters without a gradient: SplitWithSizesBackward makes zeros for them."""
    trainable: bool

    @property
    def shard_numel(self) -> int:
        return self.numel // self.group_size if self.sharded else self.numel

    def local_numels(self, trace: StepTrace, shard_rank: int) -> list[int]:
        """Elements of each parameter inside this rank's shard (``_get_shard_metadata``)."""
        if not self.sharded:
            return [trace.params[i].numel for i in self.params]
        lo, hi = shard_rank * self.shard_numel, (shard_rank + 1) * self.shard_numel
        return [
            max(0, min(hi, start + trace.params[i].numel) - max(lo, start))
            for i, start in zip(self.params, self.offsets)
        ]


def group_size(layout: Layout) -> int:
    """The flat parameters' process group: the node for HYBRID_SHARD (its intra-node shard
    group, fully_sharded_data_parallel.py ``_init_process_group_state``), else the world."""
    return layout.ranks_per_node if layout.strategy == "fsdp-hybrid" else layout.world_size


def shard_rank_of(layout: Layout, rank: int) -> int:
    # The device mesh is (nodes, ranks_per_node): the shard group is the inner dimension.
    return rank % group_size(layout)


def flat_params(trace: StepTrace, layout: Layout) -> list[FlatParam | None]:
    """One entry per unit (None for a unit without parameters); shared by every rank and
    strategy with the same group size and sharding (read-only)."""
    group, sharded = group_size(layout), layout.strategy in SHARDED
    return cached_on_trace(trace, ("fsdp1 flat params", group, sharded), lambda: _flat_params(trace, group, sharded))


def _flat_params(trace: StepTrace, group: int, sharded: bool) -> list[FlatParam | None]:
    mixed = trace.settings.family == PARAM_CAST
    members: list[list[int]] = [[] for _ in trace.unit_names]
    for index, param in enumerate(trace.params):
        members[param.unit].append(index)
    result: list[FlatParam | None] = []
    for unit, params in enumerate(members):
        if not params:
            result.append(None)
            continue
        compute = trace.params[params[0]].itemsize
        aligned = max(1, ALIGNMENT_BYTES // compute)
        offsets, total, gradless = [], 0, 0
        for index in params:
            total += -total % aligned
            offsets.append(total)
            total += trace.params[index].numel
            gradless += trace.params[index].numel if trace.params[index].grad_storage < 0 else 0
        unpadded = sum(trace.params[i].numel for i in params)
        total += -total % group
        result.append(FlatParam(
            unit=unit, params=tuple(params), offsets=tuple(offsets), numel=total, group_size=group,
            sharded=sharded, compute_itemsize=compute,
            # Mixed precision keeps the model's parameters (fp32 assumed; the trace holds
            # them cast) and casts per unshard (MixedPrecision.param_dtype).
            param_itemsize=FP32_BYTES if mixed else compute,
            zero_fill_numel=total - unpadded + gradless,
            trainable=any(trace.params[i].grad_storage >= 0 for i in params),
        ))
    return result
