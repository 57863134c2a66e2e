"""Tensor parallelism's functional collectives on the fake device (planner/fake_device/collectives.py):
what the real ones allocate, on a CPU (gloo) target and on a GPU target."""

import pytest
import torch
import torch.distributed._functional_collectives as funcol

from dpplan.planner.fake_device import StorageTracer, to_fake_device
from dpplan.planner.trace.fake_mesh import fake_tp_mesh

N = 4 * 8 * 4  # bytes of the (4, 8) fp32 input


def _events(collective, target: str) -> list[int]:
    """Births (+bytes) and deaths (-bytes) of one collective and one op on its result."""
    sizes: dict[int, int] = {}
    events: list[int] = []

    def alloc(key, nbytes):
        sizes[key] = nbytes
        events.append(nbytes)

    with fake_tp_mesh(2) as mesh:
        tracer = StorageTracer(alloc, lambda key: events.append(-sizes[key]), target_device_type=target)
        with tracer:
            x = to_fake_device(torch.empty(4, 8, device="meta"))
            events.clear()
            out = collective(x, mesh.get_group())
            result = out * 2  # the first use waits for the collective (AsyncCollectiveTensor)
            del out, result
    return events


def test_all_reduce_makes_one_output_and_nothing_else():
    """all_reduce clones its input into its output; the wait and the AsyncCollectiveTensor
    wrapper are that output, not copies (their meta kernels would make two more)."""
    for target in ("cpu", "cuda"):
        events = _events(lambda x, g: funcol.all_reduce(x, "sum", g), target)
        assert sorted(e for e in events if e > 0) == [N, N]  # the output, then out * 2


def test_all_gather_on_gloo_holds_an_input_copy_and_a_gathered_buffer():
    events = _events(lambda x, g: funcol.all_gather_single(x, 0, g), "cpu")
    assert events[:5] == [2 * N, N, -N, 2 * N, -2 * N]  # output, input copy, gloo's buffer (measured)
    events = _events(lambda x, g: funcol.all_gather_single(x, 0, g), "cuda")
    assert [e for e in events if e > 0] == [2 * N, 2 * N]  # NCCL: the output only (then out * 2)


def test_reduce_scatter_on_gloo_holds_its_buffer_until_the_wait():
    events = _events(lambda x, g: funcol.reduce_scatter_single(x, "sum", 0, g), "cpu")
    # output (a half), gloo's full-size buffer, freed when the first op waits, then out * 2
    assert events[:4] == [N // 2, N, -N, N // 2]


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_no_buffer_outlives_the_step(target):
    events = _events(lambda x, g: funcol.reduce_scatter_single(x, "sum", 0, g), target)
    assert sum(events) == -N  # everything born here died (and so did the input)
