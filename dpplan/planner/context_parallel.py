"""Context parallelism, planned by rule: each of ``cp`` ranks runs the step on its share of every
sequence (``seq_len / cp`` tokens, two load-balanced chunks of ``seq_len / 2cp``), and attention
is torch's ring attention over the cp group, which adds buffers at every attention op. Not
validated: torch's ring attention has no CPU kernel, so no CPU run can measure it, and no GPU
run has yet (the plan says so in a note).

The step at ``seq_len / cp`` is traced as any step (every op outside attention is token-local);
at each fused-attention op the tracer adds, live for the op, what torch's ring attention
allocates beside the op's own outputs, read from
torch/distributed/tensor/experimental/_context_parallel/_attention.py (torch 2.13: the default
``rotate_method`` all-gathers K/V, ``convert_to_f32`` accumulates in fp32):
  forward  (``_templated_ring_attention``): K and V made contiguous; their concatenation; the
           all-gathered K/V of the whole group (cp x); the merger's fp32 output and logsumexp;
           one step's output and logsumexp;
  backward (``_templated_ring_attention_backward``): fp32 gradient accumulators for Q, K, V;
           K and V contiguous, concatenated and all-gathered as in forward; the K/V gradients'
           fp32 concatenation and its all-to-all buffer; one step's Q/K/V gradients.
Every buffer is counted alive together for the whole op: an upper bound on the op's peak (the
real one frees a step's outputs before the next). Ring buffers of one op at a time: nothing of
them is kept for backward (the backward gathers K/V again).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

aten = torch.ops.aten
# What fused attention dispatches to on the fake device (its tensors report the CPU:
# planner/fake_device/fake_tensor.py), whatever the target; the GPU's flash and efficient
# kernels keep the same outputs (out, logsumexp) for backward.
FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
FP32 = 4


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _as_fp32(tensor: torch.Tensor) -> int:
    return tensor.numel() * FP32


def _contiguous_copies(*tensors: torch.Tensor) -> int:
    return sum(_nbytes(t) for t in tensors if not t.is_contiguous())


def forward_buffers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cp: int) -> list[int]:
    kv = _nbytes(key) + _nbytes(value)
    out_like = query  # the output has the query's shape
    lse = query.shape[0] * query.shape[1] * query.shape[2] * FP32
    return [_contiguous_copies(key, value), kv, cp * kv, _as_fp32(out_like), lse, _nbytes(out_like), lse]


def backward_buffers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cp: int) -> list[int]:
    kv = _nbytes(key) + _nbytes(value)
    kv_fp32 = _as_fp32(key) + _as_fp32(value)
    return [_as_fp32(query) + kv_fp32, _contiguous_copies(key, value), kv, cp * kv, kv_fp32, kv_fp32,
            _nbytes(query) + kv]


def ring_attention_steps(cp: int) -> Callable[[object, tuple], list[tuple] | None]:
    """The tracer's ``op_steps`` hook for ``cp`` ranks (planner/fake_device/storage_tracer.py
    replays them as planner/cpu_kernels.py's steps): ring buffers born after the op's outputs,
    all dead when it returns."""

    def steps(func, args: tuple) -> list[tuple] | None:
        if func is FORWARD:
            sizes = forward_buffers(args[0], args[1], args[2], cp)
        elif func is BACKWARD:
            sizes = backward_buffers(args[1], args[2], args[3], cp)
        else:
            return None
        names = [f"ring {i}" for i in range(len(sizes))]
        return ([("out", i) for i in range(3)] + [("+", n, b) for n, b in zip(names, sizes)]
                + [("-", n) for n in names])

    return steps


NOTE = ("context parallelism: planned by rule, not validated (each rank traced at seq_len / cp tokens; ring "
        "attention's K/V all-gather and fp32 accumulators added at each attention op, an upper bound; "
        "planner/context_parallel.py)")
