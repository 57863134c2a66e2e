"""How many samples and tokens one micro-batch holds: what a plan states, and what turns a
run's step time into throughput.

Samples: the micro-batch size (``--batch-size``). Tokens: ``batch * seq`` of the batch's
token tensor, a 2-D integer tensor of shape (batch, seq). A dict batch prefers the keys
``TOKEN_KEYS`` in that order, then any 2-D integer tensor in the dict's order; a tuple or list
its first 2-D integer tensor. A batch without one (images, features) has no tokens/s.
Padding is counted: dpplan does not know which token ids are padding.
"""

from __future__ import annotations

from typing import Any

import torch

TOKEN_KEYS = ("input_ids", "tokens", "idx", "token_ids")


def _is_token_tensor(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 2
        and not value.dtype.is_floating_point
        and not value.dtype.is_complex
        and value.dtype != torch.bool
    )


def tokens_per_micro_batch(batch: Any) -> int | None:
    """batch * seq of the token tensor (rule above); None when the batch has none."""
    if _is_token_tensor(batch):
        return int(batch.numel())
    if isinstance(batch, dict):
        candidates = [batch[k] for k in TOKEN_KEYS if k in batch] + list(batch.values())
    elif isinstance(batch, (tuple, list)):
        candidates = list(batch)
    else:
        return None
    for value in candidates:
        if _is_token_tensor(value):
            return int(value.numel())
    return None
