"""The GPU overheads outside the traced tensors (planner/gpu_overheads.py), in exact bytes.

Every expected value is worked out by hand below from the rule the module cites:
CUDACachingAllocator.cpp (512-byte blocks; 2 MiB small segments for requests up to 1 MiB,
20 MiB segments below 10 MiB, 2 MiB rounding from 10 MiB on), PyTorch's cuBLAS workspace
default (":4096:2:16:8", 32 MiB on Hopper and Blackwell) and NCCL's communicator buffers
(NVIDIA/nccl#964: 544 MB for 2 ranks, 688 MB for more; #2363: 512 MiB more across nodes).
MiB = 1,048,576 bytes; MB = 1,000,000.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dpplan.planner.gpu_overheads import (
    ProcessGroup,
    cublas_workspace_bytes,
    nccl_bytes,
    round_block,
    round_blocks,
    segment_slack,
)
from dpplan.planner.hardware import GPU_CATALOG, GpuSpec

MiB = 1024 * 1024
GiB = 1024 * MiB


# -- round_block: the caching allocator's 512-byte blocks ---------------------------------------


@pytest.mark.parametrize(
    ("nbytes", "block"),
    [
        (0, 0),  # nothing requested, no block
        (-5, 0),  # not a size: no block either
        (1, 512),  # ceil(1 / 512) = 1 block of 512
        (60, 512),  # a 3x5 fp32 tensor: 60 bytes, one block
        (512, 512),  # exactly one block
        (513, 1024),  # one byte over: ceil(513 / 512) = 2 blocks = 1024
        (4000, 4096),  # 1000 fp32: 4000 / 512 = 7.8 -> 8 blocks = 4096
        (1_000_000, 1_000_448),  # 1e6 / 512 = 1953.125 -> 1954 blocks = 1954 * 512 = 1,000,448
        (3 * GiB + 1, 3 * GiB + 512),  # past 2**31: 3 GiB is 6,291,456 blocks, one byte more is one more block
    ],
)
def test_round_block(nbytes, block):
    assert round_block(nbytes) == block


def test_round_blocks_is_round_block_of_each_size_in_int64():
    sizes = np.array([0, 1, 512, 513, 1_000_000, -3, 3 * GiB + 1], dtype=np.int64)
    rounded = round_blocks(sizes)
    # The same hand-worked values as test_round_block, element by element.
    assert rounded.tolist() == [0, 512, 512, 1024, 1_000_448, 0, 3 * GiB + 512]
    assert rounded.dtype == np.int64
    assert round_blocks([4000]).tolist() == [4096]  # a plain list is taken too


# -- segment_slack: reserved minus allocated -----------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "slack"),
    [
        ([], 0),  # no blocks, no segments
        # small pool (<= 1 MiB): packed together in 2 MiB segments
        ([512], 2 * MiB - 512),  # one 2 MiB segment holds 512 bytes: 2,097,152 - 512 = 2,096,640
        ([1 * MiB], 1 * MiB),  # exactly 1 MiB is still small: 2 MiB - 1 MiB
        ([1 * MiB, 1 * MiB], 0),  # two fill one 2 MiB segment exactly
        ([1 * MiB, 1 * MiB, 512], 2 * MiB - 512),  # 2 MiB + 512 needs 2 segments: 4 MiB - (2 MiB + 512)
        # medium (1 MiB < size < 10 MiB): 20 MiB segments, shared in order
        ([1 * MiB + 512], 20 * MiB - (1 * MiB + 512)),  # 20,971,520 - 1,049,088 = 19,922,432
        ([5 * MiB] * 4, 0),  # 4 x 5 MiB fill one 20 MiB segment
        ([5 * MiB] * 5, 15 * MiB),  # 25 MiB -> 2 segments = 40 MiB: 15 MiB = 15,728,640 left
        ([10 * MiB - 512], 10 * MiB + 512),  # just under 10 MiB is medium: 20 MiB - (10 MiB - 512)
        # large (>= 10 MiB): each block rounded up to 2 MiB on its own
        ([10 * MiB], 0),  # exactly 10 MiB is large, and 5 x 2 MiB already
        ([10 * MiB + 512], 2 * MiB - 512),  # rounds to 12 MiB: 2,096,640 left
        ([11 * MiB, 11 * MiB], 2 * MiB),  # each to 12 MiB, 1 MiB each (not pooled: 22 MiB would round to itself)
        # one of each: (2 MiB - 512) + (20 MiB - 5 MiB) + (12 MiB - 11 MiB) = 2,096,640 + 15,728,640 + 1,048,576
        ([512, 5 * MiB, 11 * MiB], 18_873_856),
    ],
)
def test_segment_slack(blocks, slack):
    assert segment_slack(blocks) == slack


def test_segment_slack_of_an_int64_array_is_an_exact_int():
    # Three 40 GiB + 512 blocks: each rounds to 40 GiB + 2 MiB, 2 MiB - 512 = 2,096,640 left each;
    # 3 x 2,096,640 = 6,289,920 (the blocks sum to 120 GiB: past 2**32, exact in int64).
    blocks = np.full(3, 40 * GiB + 512, dtype=np.int64)
    slack = segment_slack(blocks)
    assert slack == 6_289_920 and type(slack) is int


def test_segment_slack_of_rounded_blocks_as_estimate_takes_them():
    # estimate.py passes round_blocks(...) of the live tensors: 1000 fp32 (4000 -> 4096) and
    # 1e6 bytes (-> 1,000,448) are both small, 1,004,544 bytes in one 2 MiB segment:
    # 2,097,152 - 1,004,544 = 1,092,608.
    assert segment_slack(round_blocks([4000, 1_000_000])) == 1_092_608


# -- cublas_workspace_bytes: one workspace per (handle, stream) ----------------------------------

# ":4096:2:16:8" = 2 x 4096 KiB + 8 x 16 KiB = 8192 KiB + 128 KiB = 8320 KiB = 8320 x 1024 bytes.
PRE_HOPPER_WORKSPACE = 8_519_680
HOPPER_WORKSPACE = 33_554_432  # 32 MiB = 32 x 1,048,576


@pytest.mark.parametrize(
    ("gpu", "workspace"),
    [
        ("v100-32gb", PRE_HOPPER_WORKSPACE),  # 7.0
        ("t4-16gb", PRE_HOPPER_WORKSPACE),  # 7.5
        ("a100-40gb", PRE_HOPPER_WORKSPACE),  # 8.0
        ("a10g-24gb", PRE_HOPPER_WORKSPACE),  # 8.6
        ("l4-24gb", PRE_HOPPER_WORKSPACE),  # 8.9 (Ada)
        ("h100-80gb", HOPPER_WORKSPACE),  # 9.0
        ("h200-141gb", HOPPER_WORKSPACE),  # 9.0
        ("b200-180gb", HOPPER_WORKSPACE),  # 10.0
    ],
)
def test_cublas_workspace_of_catalog_gpus(gpu, workspace):
    assert cublas_workspace_bytes(GPU_CATALOG[gpu]) == workspace


def test_cublas_workspace_of_a_consumer_blackwell():
    # Compute capability 12.x (GeForce RTX 50 series) is Blackwell: 32 MiB. No catalog entry yet.
    rtx_5090 = GpuSpec(name="rtx-5090-32gb", description="NVIDIA GeForce RTX 5090", memory_bytes=32 * GiB,
                       compute_capability=(12, 0), cuda_context_bytes=512 * MiB)
    assert cublas_workspace_bytes(rtx_5090) == HOPPER_WORKSPACE


# -- nccl_bytes: communicator buffers per process group ------------------------------------------

TWO_RANKS = 544_000_000  # 544 MB
MORE_RANKS = 688_000_000  # 688 MB
NETWORK = 536_870_912  # 512 MiB = 512 x 1,048,576


def group(num_ranks, spans_nodes=False):
    return ProcessGroup(num_ranks=num_ranks, spans_nodes=spans_nodes)


@pytest.mark.parametrize(
    ("groups", "nbytes"),
    [
        ([], 0),  # one GPU: no process group
        ([group(1)], 0),  # a group of one rank has no communicator
        ([group(1, spans_nodes=True)], 0),  # ...and no network buffers either: skipped whole
        ([group(2)], TWO_RANKS),  # 544,000,000
        ([group(3)], MORE_RANKS),  # more than 2 ranks: 688,000,000
        ([group(8)], MORE_RANKS),  # the same for 8: not per rank
        ([group(2, spans_nodes=True)], 1_080_870_912),  # 544,000,000 + 536,870,912
        ([group(16, spans_nodes=True)], 1_224_870_912),  # DDP over 2 nodes of 8: 688,000,000 + 536,870,912
        # HYBRID_SHARD on 2 nodes of 8: a group of 8 inside the node, one of 2 across the nodes:
        # 688,000,000 + (544,000,000 + 536,870,912) = 1,768,870,912
        ([group(8), group(2, spans_nodes=True)], 1_768_870_912),
        ([group(1), group(2), group(1)], TWO_RANKS),  # one-rank groups add nothing to the others
    ],
)
def test_nccl_bytes(groups, nbytes):
    assert nccl_bytes(groups) == nbytes


def test_process_group_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        ProcessGroup(2, False)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        group(2).num_ranks = 4  # type: ignore[misc]
