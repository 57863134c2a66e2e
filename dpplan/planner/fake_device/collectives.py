"""Tensor parallelism's collectives on the fake device: torch's functional collectives
(``_c10d_functional``, what DTensor redistributes with), as the real ones allocate.

Their meta kernels size the outputs right (an all-gather's W shards, a reduce-scatter's one)
but differ from the device in two ways the trace corrects:
  - ``wait_tensor`` returns its input itself on the device (the collective wrote into it), and
    ``_wrap_tensor_autograd`` an ``AsyncCollectiveTensor`` around it
    (torch/distributed/_functional_collectives.py), where their meta kernels return new
    tensors: copies that never exist;
  - on a CPU (gloo) run the collectives allocate buffers of their own, measured with the
    profiler's memory events on 2 and 4 gloo ranks, torch 2.13 (an input of N bytes, W ranks):
      all_gather_into_tensor  output W·N, then a copy of the input (N, freed), then gloo's
                              gathered buffer (W·N, freed) before it returns;
      reduce_scatter_tensor   output N/W, and a full-size buffer (N) that lives until the
                              ``wait_tensor`` of its output (the first op that uses it: an
                              AsyncCollectiveTensor waits then);
      all_reduce              output N (the input cloned), nothing else.
    NCCL allocates no tensors of its own: on a GPU target only the wait is corrected.
"""

from __future__ import annotations

from typing import Any

import torch

NAMESPACE = "_c10d_functional"


def is_collective(func) -> bool:
    return getattr(func, "namespace", None) == NAMESPACE


def is_wait(func) -> bool:
    return func.__name__ == "wait_tensor.default"


def is_async_wrapper(func) -> bool:
    return func.__name__ == "_wrap_tensor_autograd.default"


def input_bytes(args: tuple) -> int:
    tensor = args[0]
    return tensor.numel() * tensor.element_size()


def gloo_steps(func, args: tuple) -> list[tuple] | None:
    """Replay steps (planner/cpu_kernels.py's form: ``("+", name, bytes)`` born, ``("-", name)``
    dies, ``("out", i)`` output born) of a gloo collective's own buffers, None: none."""
    name = func.__name__
    if name == "all_gather_into_tensor.default":
        nbytes, world = input_bytes(args), int(args[1])
        return [("out", 0), ("+", "input copy", nbytes), ("-", "input copy"),
                ("+", "gathered", world * nbytes), ("-", "gathered")]
    return None


def waits_with_buffer(func) -> bool:
    """A gloo collective whose full-size buffer lives until its output is waited for."""
    return func.__name__ == "reduce_scatter_tensor.default"


def buffer_until_wait(args: tuple) -> torch.Tensor:
    """The meta stand-in of a reduce-scatter's full-size gloo buffer."""
    return torch.empty(input_bytes(args), dtype=torch.uint8, device="meta")


def release_on_wait(pending: dict[int, Any], waited: torch.Tensor) -> None:
    """The collective that produced ``waited`` has finished: its buffer dies."""
    pending.pop(waited.untyped_storage()._cdata, None)
