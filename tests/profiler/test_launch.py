from pathlib import Path

import pytest

from dpplan.planner.hardware import match_gpu
from dpplan.profiler.launch import LaunchSpec, torchrun_args, user_commands


def test_one_node_is_standalone_with_per_rank_logs():
    args = torchrun_args(LaunchSpec(nproc_per_node=4, log_dir=Path("/r/logs")))
    assert args == ["--standalone", "--nproc-per-node=4", "--log-dir=/r/logs", "--redirects=3"]


def test_several_nodes_pass_torchruns_flags_through():
    spec = LaunchSpec(nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29400")
    assert torchrun_args(spec) == ["--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--rdzv-endpoint=node0:29400"]
    commands = user_commands(spec, '{"strategy": "ddp"}', "out")
    assert commands["torchrun"].startswith(
        "torchrun --nproc-per-node=8 --nnodes=2 --node-rank=1 --rdzv-endpoint=node0:29400 -m dpplan.profiler.worker")
    assert "'{\"strategy\": \"ddp\"}'" in commands["torchrun"]
    assert commands["srun"].startswith("srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 torchrun")
    assert "--rdzv-id=$SLURM_JOB_ID " in commands["srun"]


def test_several_nodes_need_an_endpoint():
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        LaunchSpec(nproc_per_node=8, nnodes=2)


@pytest.mark.parametrize(("name", "gib", "key"), [
    ("NVIDIA H100 80GB HBM3", 80, "h100-80gb"),
    ("NVIDIA H100 PCIe", 80, "h100-pcie-80gb"),
    ("NVIDIA A100-SXM4-40GB", 40, "a100-40gb"),
    ("NVIDIA H200", 140, "h200-141gb"),
    ("NVIDIA L4", 22, "l4-24gb"),
    ("NVIDIA L40S", 45, "l40s-48gb"),
    ("NVIDIA GeForce GTX 1080", 8, None),
])
def test_detected_gpu_names_map_to_the_catalog(name, gib, key):
    assert match_gpu(name, gib << 30) == key
