"""The strategy registry: one declaration per strategy, read by every layer."""

import inspect
import subprocess
import sys

import pytest

from dpplan.planner.gpu_overheads import ProcessGroup
from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.protocol import StrategyPlanner
from dpplan.planner.strategies.registry import REGISTRY, STRATEGIES, DataAxes, planner_of, strategy_info


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_module_fulfils_the_protocol(name):
    planner = planner_of(name)
    for function in ("plan_rank", "ranks_to_evaluate", "process_groups", "refusal"):
        ours = getattr(planner, function, None)
        assert callable(ours), f"{name}: strategies/{strategy_info(name).module}.py has no {function}"
        expected = list(inspect.signature(getattr(StrategyPlanner, function)).parameters)[1:]  # without self
        assert len(inspect.signature(ours).parameters) == len(expected), f"{name}.{function}"


def test_meshes_of_the_data_parallel_strategies():
    assert strategy_info("ddp").mesh(8).dp_replicate == 8
    assert strategy_info("fsdp-no-shard").mesh(8).dp_replicate == 8  # NO_SHARD replicates, as DDP
    assert strategy_info("zero3").mesh(8).dp_shard == 8
    hybrid = strategy_info("fsdp-hybrid").mesh(16, num_nodes=2)
    assert (hybrid.dp_replicate, hybrid.dp_shard) == (2, 8)
    assert strategy_info("fsdp-hybrid").data_axes is DataAxes.HYBRID
    with pytest.raises(ValueError, match="single runs on one GPU"):
        strategy_info("single").mesh(2)
    with pytest.raises(ValueError, match="unknown strategy 'fsdp3'"):
        strategy_info("fsdp3")


def test_process_groups_are_the_mesh_axes():
    """HYBRID_SHARD: one group of 8 inside each node, one of 2 across nodes; DDP over 2 nodes:
    one group of 16 that leaves the node; DataParallel: one process, no group; one rank: none."""
    groups = planner_of("fsdp-hybrid").process_groups(Layout.of("fsdp-hybrid", 16, 2))
    assert sorted(groups, key=lambda g: g.num_ranks) == [
        ProcessGroup(num_ranks=2, spans_nodes=True), ProcessGroup(num_ranks=8, spans_nodes=False)
    ]
    assert planner_of("ddp").process_groups(Layout.of("ddp", 16, 2)) == [ProcessGroup(num_ranks=16, spans_nodes=True)]
    assert planner_of("dp").process_groups(Layout.of("dp", 8)) == []
    assert planner_of("single").process_groups(Layout.of("single", 1)) == []


def test_registry_facts_the_layers_read():
    assert [n for n, i in REGISTRY.items() if not i.offload] == ["single", "dp", "ddp", "ddp-zero1"]
    assert {n: i.deepspeed_stage for n, i in REGISTRY.items() if i.deepspeed_stage} == {"zero1": 1, "zero2": 2, "zero3": 3}
    assert [n for n, i in REGISTRY.items() if i.not_runnable] == ["dp"]
    assert [n for n, i in REGISTRY.items() if i.casts_buffers] == ["fsdp-full", "fsdp-grad-op", "fsdp-no-shard", "fsdp-hybrid"]


def test_the_registry_imports_no_torch():
    """The CLI builds its options from the registry at start-up, before any torch import."""
    code = "import sys, dpplan.planner.strategies.registry, dpplan.planner.strategies.layout; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
