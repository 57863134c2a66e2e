"""Memory a GPU rank spends outside the traced tensors: what no closed-form estimator counts.

Three layers, as ``torch.cuda`` and NVML see them:
  allocated  tensor bytes, each block rounded up by the caching allocator, plus the cuBLAS
             workspace (allocated through the caching allocator);
  reserved   allocated plus the caching allocator's segment slack;
  device     reserved plus the CUDA context and NCCL communicator buffers, which only NVML
             sees.
None of these constants is fitted to dpplan's validation runs; each is cited. Those that a
GPU run has not yet confirmed are marked so in the estimate's notes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpplan.planner.hardware import GpuSpec, MiB

# CUDACachingAllocator.cpp: kMinBlockSize = 512 (every block is a multiple of 512 bytes),
# kSmallSize = 1 MiB (requests up to 1 MiB come from the small pool, in kSmallBuffer = 2 MiB
# segments), kLargeBuffer = 20 MiB (requests between 1 MiB and kMinLargeAlloc = 10 MiB get a
# 20 MiB segment), kRoundLarge = 2 MiB (larger requests are rounded up to 2 MiB segments).
ALLOCATOR_BLOCK_BYTES = 512
SMALL_REQUEST_BYTES = 1 * MiB
SMALL_SEGMENT_BYTES = 2 * MiB
MEDIUM_REQUEST_BYTES = 10 * MiB
MEDIUM_SEGMENT_BYTES = 20 * MiB
LARGE_ROUNDING_BYTES = 2 * MiB

# PyTorch notes/cuda.rst "cuBLAS workspaces": CUBLAS_WORKSPACE_CONFIG default ":4096:2:16:8",
# 2 x 4096 KiB + 8 x 16 KiB = 8,320 KiB per (handle, stream); CublasHandlePool.cpp: 32 MiB on
# Hopper and Blackwell (compute capability 9.x, 10.x, 12.x). One stream runs the GEMMs here.
CUBLAS_WORKSPACE_BYTES_PRE_HOPPER = 8320 * 1024
CUBLAS_WORKSPACE_BYTES_HOPPER = 32 * MiB

# NCCL communicator buffers per process group per GPU, NVIDIA/nccl#964 (4x A100, NVLink):
# 544 MB for a 2-rank group, 688 MB for a group of more than 2 ranks. Groups that span nodes
# also keep network P2P buffers, 512 MiB in NVIDIA/nccl#2363.
NCCL_GROUP_BYTES_TWO_RANKS = 544 * 10**6
NCCL_GROUP_BYTES_MORE_RANKS = 688 * 10**6
NCCL_NETWORK_BUFFER_BYTES = 512 * MiB


@dataclass(frozen=True, kw_only=True)
class ProcessGroup:
    num_ranks: int
    spans_nodes: bool


def cublas_workspace_bytes(gpu: GpuSpec) -> int:
    major = gpu.compute_capability[0]
    return CUBLAS_WORKSPACE_BYTES_HOPPER if major in (9, 10, 12) else CUBLAS_WORKSPACE_BYTES_PRE_HOPPER


def nccl_bytes(groups: list[ProcessGroup]) -> int:
    total = 0
    for group in groups:
        if group.num_ranks < 2:
            continue
        total += NCCL_GROUP_BYTES_TWO_RANKS if group.num_ranks == 2 else NCCL_GROUP_BYTES_MORE_RANKS
        if group.spans_nodes:
            total += NCCL_NETWORK_BUFFER_BYTES
    return total


def round_block(nbytes: int) -> int:
    """The block the caching allocator hands out for a request of ``nbytes``."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES


def round_blocks(nbytes: np.ndarray) -> np.ndarray:
    """``round_block`` of each size (int64 in, int64 out)."""
    nbytes = np.asarray(nbytes, dtype=np.int64)
    return np.where(nbytes > 0, -(-nbytes // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES, 0)


def segment_slack(live_block_bytes) -> int:
    """Reserved minus allocated for these live blocks, if each were alone in its segment
    class: large blocks rounded up to 2 MiB, medium ones in 20 MiB segments shared in order,
    small ones packed in 2 MiB segments. A lower bound: reuse of freed blocks by
    different sizes (fragmentation over time) only adds to it. Sizes as a sequence or an
    int64 array (sums in int64 are exact: far below 2**63 bytes)."""
    blocks = np.asarray(live_block_bytes, dtype=np.int64)
    small = int(blocks[blocks <= SMALL_REQUEST_BYTES].sum())
    medium = int(blocks[(blocks > SMALL_REQUEST_BYTES) & (blocks < MEDIUM_REQUEST_BYTES)].sum())
    large = blocks[blocks >= MEDIUM_REQUEST_BYTES]
    slack = -(-small // SMALL_SEGMENT_BYTES) * SMALL_SEGMENT_BYTES - small
    slack += -(-medium // MEDIUM_SEGMENT_BYTES) * MEDIUM_SEGMENT_BYTES - medium
    slack += int((-(-large // LARGE_ROUNDING_BYTES) * LARGE_ROUNDING_BYTES - large).sum())
    return slack
