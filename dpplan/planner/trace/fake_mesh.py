"""A device mesh without devices or peers, for tracing one rank of a tensor- or expert-parallel plan.

torch's fake process group (torch/testing/_internal/distributed/fake_pg.py, the backend
torchtitan's and torch's own fake-tensor tests shard models with) lets ``init_device_mesh``
and DTensor run in one process: collectives return at once, and on the fake device they run
only their meta kernels, which size their outputs as the real ones (all-gather: the group's
shards; reduce-scatter: one shard). The trace then counts what one rank holds: its DTensor
shards, the gathered activations, the redistribution buffers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from dpplan.planner.trace.errors import TracerBug


def fake_tp_mesh(tp: int, rank: int = 0) -> contextlib.AbstractContextManager:
    """A 1-D ``tp`` mesh of ``tp`` fake ranks, as rank ``rank`` sees it, for the duration."""
    return fake_mesh(tp, "tp", rank)


@contextlib.contextmanager
def fake_mesh(size: int, name: str, rank: int = 0) -> Iterator:
    """A 1-D mesh named ``name`` of ``size`` fake ranks, as rank ``rank`` sees it."""
    from torch.distributed.device_mesh import init_device_mesh

    with fake_process_group(size, rank):
        yield init_device_mesh("cpu", (size,), mesh_dim_names=(name,))


@contextlib.contextmanager
def fake_process_group(size: int, rank: int) -> Iterator:
    """The default process group: ``size`` fake ranks, this process rank ``rank``."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise TracerBug("a process group is already initialized in the planning process")
    # DTensor computes output shapes under torch's FakeTensorMode, which logs (at ERROR, with a
    # traceback) every op the model makes fail before re-raising it: the trace reports the
    # failure itself, in one line
    fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_tensor_log.level
    fake_tensor_log.setLevel(logging.CRITICAL)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        fake_tensor_log.setLevel(level)
