"""The device mesh: world size, groups' strides and whether they leave a node, worked by hand."""

import pytest

from dpplan.planner.strategies.layout import Layout
from dpplan.planner.strategies.mesh import Mesh, MeshAxis


def test_axes_are_laid_out_outermost_first_like_torchtitan():
    # 2 nodes x 8 ranks; pp=2 outermost, then dp_shard=2, then tp=4 innermost:
    # tp groups are 4 neighbours (stride 1) inside a node; dp_shard steps over tp (stride 4),
    # a block of 8 = one node; pp steps over a whole node (stride 8) and crosses nodes.
    mesh = Mesh(pp=2, dp_shard=2, tp=4, num_nodes=2)
    assert mesh.world_size == 16 and mesh.ranks_per_node == 8 and mesh.dp_size == 2
    assert mesh.axes() == [
        MeshAxis("pp", 2, 8, True),
        MeshAxis("dp_shard", 2, 4, False),
        MeshAxis("tp", 4, 1, False),
    ]
    # rank 13 = pp 1, dp_shard 1, tp 1 (13 = 1*8 + 1*4 + 1)
    assert [mesh.coordinate(13, a) for a in ("pp", "dp_shard", "tp", "cp")] == [1, 1, 1, 0]


def test_hybrid_sharding_mesh_replicates_across_nodes():
    mesh = Mesh(dp_replicate=4, dp_shard=8, num_nodes=4)
    assert mesh.axis("dp_replicate") == MeshAxis("dp_replicate", 4, 8, True)
    assert mesh.axis("dp_shard") == MeshAxis("dp_shard", 8, 1, False)
    assert mesh.axis("tp") == MeshAxis("tp", 1, 1, False)
    assert mesh.describe() == "dp_replicate=4 x dp_shard=8 over 4 nodes"


def test_one_data_parallel_axis_over_several_nodes_spans_them():
    assert Mesh(dp_shard=16, num_nodes=2).axes() == [MeshAxis("dp_shard", 16, 1, True)]
    assert Mesh(dp_shard=8, num_nodes=1).axes() == [MeshAxis("dp_shard", 8, 1, False)]
    assert Mesh().axes() == [] and Mesh().describe() == "1 rank over 1 node"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dp_shard=0), "dp_shard must be >= 1"),
        (dict(dp_shard=6, num_nodes=4), "do not split evenly into 4 nodes"),
        (dict(dp_shard=3, ep=2), "ep=2 must divide dp_shard x cp = 3"),
        # 12 ranks on 2 nodes of 6: tp=4 groups would be ranks 0-3, 4-7 (two nodes), 8-11
        (dict(dp_shard=3, tp=4, num_nodes=2), "tp (size 4) straddles nodes of 6 ranks unevenly"),
    ],
)
def test_impossible_meshes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Mesh(**kwargs)


def test_every_axis_is_planned_and_cp_ranks_shard_with_dp():
    layout = Layout(strategy="fsdp2", mesh=Mesh(dp_shard=2, cp=2), rank=3)
    assert (layout.dp_shard_size, layout.dp_shard_rank) == (4, 3)  # torchtitan's dp_shard_cp
    assert Layout(strategy="fsdp2", mesh=Mesh(dp_shard=2, tp=2)).dp_shard_size == 2  # tp is traced
    assert Layout(strategy="ddp", mesh=Mesh(dp_replicate=2, pp=2)).world_size == 4  # pp: one trace per stage rank
    with pytest.raises(ValueError, match="rank 4 is outside a mesh of 4 ranks"):
        Layout(strategy="fsdp2", mesh=Mesh(dp_shard=4), rank=4)
