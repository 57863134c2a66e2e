"""A share of a plan computed in a forked child gives the same plan; failures come back."""

import os
import signal
import time
from pathlib import Path

import pytest

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner import forked
from dpplan.planner.estimate import estimate
from dpplan.planner.strategies import STRATEGIES
from dpplan.planner.trace import TraceError

BENCHMARK_MODELS = Path(__file__).resolve().parents[2] / "benchmarks" / "models"
needs_fork = pytest.mark.skipif(not forked.can_fork(), reason="plans run in one process here")


@needs_fork
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp32"])
def test_two_processes_plan_what_one_plans(tiny_gpt, precision):
    """bf16-mixed: the child traces FSDP1's family and plans it, this process FSDP2's, and
    both take the autocast family's estimates from its queue. fp32: one trace serves all, and
    both take every estimate from one queue."""
    config = PlanConfig(run=RunSpec(model=tiny_gpt, batch_size=2, precision=precision), gpus=(1, 2, 4, 8))
    one, two = estimate(config, processes=1), estimate(config, processes=2)
    assert two.estimates == one.estimates
    assert len(one.estimates) == 1 + 4 * (len(STRATEGIES) - 1)
    assert two.model.num_traced_ops == one.model.num_traced_ops


@needs_fork
def test_a_failure_in_the_child_is_raised_in_the_parent():
    """The LSTM cannot run with bf16 parameters and a float32 input: the FSDP traces fail in
    both processes, and the one-line error is the same as in one process."""
    config = PlanConfig(run=RunSpec(model=str(BENCHMARK_MODELS / "custom.py"), precision="bf16-mixed"), gpus=(2,))
    with pytest.raises(TraceError) as in_one:
        estimate(config, processes=1)
    with pytest.raises(TraceError) as in_two:
        estimate(config, processes=2)
    assert str(in_two.value) == str(in_one.value)
    assert "RNN input dtype" in str(in_two.value)


@needs_fork
def test_returned_values_and_exceptions_cross_the_pipe():
    assert forked.start(lambda: {"bytes": 1 << 40, "list": list(range(10**5))}).result()["bytes"] == 1 << 40

    def fails():
        raise ValueError("bad wrap class")

    with pytest.raises(ValueError, match="bad wrap class"):
        forked.start(fails).result()


@needs_fork
def test_the_work_queue_hands_each_index_out_once():
    """Two processes drain one queue: every index is taken, none twice."""
    queue = forked.WorkQueue(1000)

    def drain() -> list[int]:
        taken = []
        while (index := queue.take()) is not None:
            taken.append(index)
            time.sleep(0.001)  # as if planning: the other process gets its turn
        return taken

    child = forked.start(drain)
    mine = drain()
    theirs = child.result()
    queue.close()
    assert sorted(mine + theirs) == list(range(1000))
    assert mine and theirs  # both took a share


@needs_fork
def test_cancel_leaves_no_process_behind():
    call = forked.start(lambda: time.sleep(60))
    call.cancel()
    with pytest.raises(ChildProcessError):
        os.waitpid(call.pid, os.WNOHANG)  # reaped: no such child any more


@needs_fork
def test_a_child_stopped_by_ctrl_c_is_an_interrupt():
    call = forked.start(lambda: time.sleep(60))
    time.sleep(0.2)
    os.kill(call.pid, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        call.result()


@needs_fork
def test_without_a_process_to_fork_the_plan_is_made_here(tiny_gpt, monkeypatch):
    config = PlanConfig(run=RunSpec(model=tiny_gpt, precision="bf16-mixed"), gpus=(1, 2))
    expected = estimate(config, processes=1).estimates

    def no_fork():
        raise BlockingIOError("Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    assert estimate(config, processes=2).estimates == expected
