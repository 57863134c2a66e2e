"""Hugging Face MoE decoders of the transformers zoo with a router that balances by construction.

The accuracy suite's control for expert parallelism: ``--ep`` is planned for a balanced
router (training/expert_parallel.py), while a real router at random init sends the ranks of an
expert group a few percent more or fewer (token, expert) pairs than the mean. Here each
model's own router runs unchanged (its logits feed the load-balancing loss and its weights get
gradients), and a forward hook replaces only its choice of experts: pair ``j`` of token ``t``
goes to expert ``(t * k + j) mod E``, so every expert, and every rank of an expert group, gets
the same number of pairs. The gap between the plan and these runs is the planner's own; the
gap on the unmodified models adds the router's imbalance.

    mixtral  olmoe  qwen3_moe  mixtral_2_experts   (factories: benchmarks/models/moe_balanced_router.py:mixtral)
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "hf"))

from zoo import ZOO, loss_fn  # noqa: E402


def _balanced_choice(router, args, output):
    logits, scores, indices = output
    tokens, k = indices.shape
    pairs = torch.arange(tokens * k, device=indices.device).view(tokens, k)
    return logits, scores, pairs % logits.shape[-1]


def _build(name: str, **config):
    entry = ZOO[name]
    model = replace(entry, config={**entry.config, **config}).build_model()
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(_balanced_choice)
    return model


def mixtral():
    return _build("mixtral")


def olmoe():
    return _build("olmoe")


def qwen3_moe():
    return _build("qwen3_moe")


def mixtral_2_experts():
    """Two experts: with --ep 2 on 4 ranks each rank holds one, split over its 2 expert-shard
    ranks on dim 1 (training/expert_parallel.py ``expert_shard_dim``)."""
    return _build("mixtral", num_local_experts=2)


def example_batch(batch_size):
    return ZOO["mixtral"].batch(batch_size)  # the three share VOCAB and SEQ: token ids and labels


__all__ = ["mixtral", "olmoe", "qwen3_moe", "mixtral_2_experts", "example_batch", "loss_fn"]
