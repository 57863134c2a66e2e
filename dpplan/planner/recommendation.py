"""What to run, read off a plan's estimates: one strategy, GPU count, micro-batch and offload.

The rule, in order (each step only breaks the ties of the one before):
1. **It fits** at the planned micro-batch, with the headroom kept free (``StrategyEstimate.fits``).
2. **Fewest GPUs**: the plan answers "on how many GPUs"; more GPUs than needed is the user's
   choice, not the planner's.
3. **No offload** before offload: a strategy that fits without moving state to the host is not
   slowed by host transfers (within one plan only strategies without offload, planned without
   it, differ from the offload asked for).
4. **No wrapper where none is needed**: on one data-parallel rank (1 GPU, or --gpus = --tp),
   ``single`` before a data-parallel wrapper over that one rank, which has nothing to shard or
   reduce across (measured on the bundled GPT: fsdp-full on 1 GPU peaks 6 MiB below single, a
   margin no one wraps a one-GPU run in FSDP for).
5. **Most room**: the lowest peak, so the largest margin for what an estimate cannot know
   (fragmentation beyond the allocator model, other processes on the GPU).
6. The registry's order (strategies/registry.py): the simpler wrapper first.

``dp`` (``nn.DataParallel``) is recommended only when nothing else was planned: PyTorch's
documentation recommends DistributedDataParallel instead even on a single node
(torch/nn/parallel/data_parallel.py, the ``DataParallel`` docstring), and it cannot span nodes.

When nothing fits, the recommendation is the estimate closest to fitting (the lowest share of
its usable memory) and what to change (``FitChange``), each with the plan's number that says
why, roughly cheapest first: a smaller micro-batch (when one fits); activation checkpointing
(when the peak holds activations); more GPUs (when the closest shards its state and is at the
most GPUs planned for it) or a sharding strategy (when no
planned strategy shards); offload (GPU targets: optimizer state, then ZeRO-3's parameters).

Pure and torch-free: estimates in, a ``PlanRecommendation`` out.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpplan.config import OFFLOADS, usable_bytes
from dpplan.planner.plan import ChangeKind, FitChange, PlanRecommendation, StrategyEstimate
from dpplan.planner.strategies.registry import STRATEGIES, DataAxes, Wrapper, strategy_info

SHARDING_STRATEGIES = ("fsdp2", "zero3")
"""What to suggest when no planned strategy shards the model's state (torch's own, then DeepSpeed's)."""


def run_offload(estimate: StrategyEstimate) -> str:
    """The offload the estimate's run has: the plan's, or none for a strategy without offload
    (estimate.py plans those without it and says so in a note)."""
    return estimate.offload if strategy_info(estimate.strategy).offload else "none"


def usable(estimate: StrategyEstimate) -> int:
    return usable_bytes(estimate.capacity_bytes, estimate.headroom_pct)


def recommend(estimates: Sequence[StrategyEstimate]) -> PlanRecommendation | None:
    """The estimate to run by the rule above, or the closest with what to change; None
    without estimates."""
    candidates = [e for e in estimates if strategy_info(e.strategy).wrapper is not Wrapper.DATA_PARALLEL]
    candidates = candidates or list(estimates)
    if not candidates:
        return None
    fitting = [e for e in candidates if e.fits]
    if fitting:
        best = min(fitting, key=lambda e: (e.gpus, OFFLOADS.index(run_offload(e)),
                                           not strategy_info(e.strategy).single_device, e.peak_bytes,
                                           STRATEGIES.index(e.strategy)))
        return _recommendation(best, fits=True)
    closest = min(candidates, key=lambda e: (e.peak_bytes / max(1, usable(e)), STRATEGIES.index(e.strategy)))
    return _recommendation(closest, fits=False, changes=changes_to_fit(closest, candidates))


def _recommendation(estimate: StrategyEstimate, *, fits: bool,
                    changes: list[FitChange] | None = None) -> PlanRecommendation:
    return PlanRecommendation(
        fits=fits, strategy=estimate.strategy, gpus=estimate.gpus, nodes=estimate.nodes, layout=estimate.layout,
        batch_size=estimate.batch_size, max_batch_size=estimate.max_batch_size, offload=run_offload(estimate),
        peak_bytes=estimate.peak_bytes, usable_bytes=usable(estimate), capacity_bytes=estimate.capacity_bytes,
        headroom_pct=estimate.headroom_pct, changes=list(changes or ()),
    )


def changes_to_fit(closest: StrategyEstimate, estimates: Sequence[StrategyEstimate]) -> list[FitChange]:
    """What to try when no estimate fits, each with the number behind it (see the module docstring)."""
    changes = []
    smaller = [e for e in estimates if 1 <= e.max_batch_size < e.batch_size]
    if smaller:
        best = min(smaller, key=lambda e: (e.gpus, -e.max_batch_size, STRATEGIES.index(e.strategy)))
        changes.append(FitChange(kind=ChangeKind.SMALLER_BATCH, flags=f"--batch-size {best.max_batch_size}",
                                 strategy=best.strategy, gpus=best.gpus, nbytes=0))

    def change(kind: ChangeKind, flags: str, nbytes: int) -> FitChange:
        return FitChange(kind=kind, flags=flags, strategy=closest.strategy, gpus=closest.gpus, nbytes=nbytes)

    activations = closest.breakdown.get("activations", 0)
    if not closest.activation_checkpointing and activations > 0:
        changes.append(change(ChangeKind.CHECKPOINTING, "--activation-checkpointing", activations))
    state = sum(closest.breakdown.get(key, 0) for key in ("params", "grads", "optimizer"))
    sharding = (DataAxes.SHARD, DataAxes.HYBRID)
    most_gpus = max(e.gpus for e in estimates if e.strategy == closest.strategy)
    if state > 0 and strategy_info(closest.strategy).data_axes in sharding:
        if closest.gpus == most_gpus:  # else more GPUs did not bring it closer in this plan
            changes.append(change(ChangeKind.MORE_GPUS, f"--gpus {2 * most_gpus}", state))
    elif state > 0 and not any(strategy_info(e.strategy).data_axes in sharding for e in estimates):
        changes.append(change(ChangeKind.SHARDING, f"--strategy {','.join(SHARDING_STRATEGIES)}", state))
    if closest.device == "cuda":  # on cpu the host is the device: offload frees nothing
        changes += _heavier_offload(closest)
    return changes


def _heavier_offload(closest: StrategyEstimate) -> list[FitChange]:
    """The next offload to try; none when the closest strategy offloads all it can already
    (FSDP's CPU offload moves parameters, gradients and optimizer state with either value)."""
    info = strategy_info(closest.strategy)
    breakdown = closest.breakdown
    if not info.offload or closest.offload == "none":
        flags = "--offload optimizer" + ("" if info.offload else f" --strategy {','.join(SHARDING_STRATEGIES)}")
        return [FitChange(kind=ChangeKind.OFFLOAD_OPTIMIZER, flags=flags, strategy=closest.strategy, gpus=closest.gpus,
                          nbytes=breakdown.get("optimizer", 0))]
    if closest.offload == "optimizer" and info.deepspeed_stage is not None:
        flags = "--offload optimizer+params" + ("" if info.deepspeed_stage == 3 else " --strategy zero3")
        return [FitChange(kind=ChangeKind.OFFLOAD_PARAMS, flags=flags, strategy=closest.strategy, gpus=closest.gpus,
                          nbytes=breakdown.get("params", 0))]
    return []
