"""GPU catalog: memory capacity and the per-GPU runtime overheads dpplan adds on GPU targets.

Capacities are the vendor's marketed memory. GB (10^9 bytes) and GiB (2^30) are kept apart:
"80GB" on an H100 datasheet is 80 GiB of HBM3 as CUDA reports it (85,520,809,984 bytes
total per nvidia-smi on H100 SXM: 81,559 MiB), so each entry stores the bytes CUDA reports
where known, else the nominal GiB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dpplan.errors import UsageError

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    name: str
    """Catalog key used by ``--gpu``."""
    description: str
    memory_bytes: int
    """Total device memory as CUDA reports it."""
    compute_capability: tuple[int, int]
    cuda_context_bytes: int
    """Driver and CUDA context memory outside PyTorch's allocator, measured on this card with
    CUDA lazy module loading where a source gives it, otherwise the 0.5 GiB middle of the
    0.3-0.6 GiB range reported in pytorch#107667 / #109888."""
    gpus_per_node: int = 8
    """GPUs in the server this card usually comes in: the node size ``dpplan estimate`` plans
    by default (``--gpus 16`` on 8-GPU nodes is 2 nodes); the sources are above the catalog."""


# Sources for capacities: NVIDIA and AMD datasheets; totals as reported by nvidia-smi where
# quoted in public issues. Context sizes: pytorch#107667, #109888 (ptrblck: ~300-400 MB with
# lazy loading), unsloth-zoo#1053 (426 MiB on RTX 6000 Ada), llama.cpp#23604 (larger on
# GPUs with more SMs). dpplan's own GPU validation replaces these when it has measured one.
_DEFAULT_CONTEXT = 512 * MiB
# Node sizes (gpus_per_node), the usual server of each card: 8 for the SXM/OAM baseboards,
# NVIDIA DGX/HGX H100, H200, B200, A100 and DGX-1 (V100), and AMD's MI300X platform (8 OAM), as
# in the clouds' largest instances (AWS p5/p5e/p6-b200/p4d/p4de/p3dn 8 GPUs, Azure ND MI300X v5
# 8); 8 for PCIe data-centre cards in 8-slot servers (AWS g6e.48xlarge: 8 L40S, g6.48xlarge and
# GCP g2-standard-96: 8 L4, g5.48xlarge: 8 A10G; H100 PCIe and NVL: four NVLink-bridged pairs);
# 4 for GB200 (one NVL72 compute tray hosts two GB200 superchips, four B200 GPUs), T4 (AWS
# g4dn.12xlarge and GCP N1: up to 4), and workstation cards (RTX 4090, RTX 6000 Ada: towers such
# as Lambda Vector hold up to four). ``--gpus-per-node`` or ``--nodes`` says otherwise.

GPU_CATALOG: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec(name="h100-80gb", description="NVIDIA H100 SXM 80GB", memory_bytes=81559 * MiB, compute_capability=(9, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="h100-pcie-80gb", description="NVIDIA H100 PCIe 80GB", memory_bytes=81559 * MiB, compute_capability=(9, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="h100-nvl-94gb", description="NVIDIA H100 NVL 94GB", memory_bytes=95830 * MiB, compute_capability=(9, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="h200-141gb", description="NVIDIA H200 141GB", memory_bytes=143771 * MiB, compute_capability=(9, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="b200-180gb", description="NVIDIA B200 180GB", memory_bytes=183359 * MiB, compute_capability=(10, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="gb200-186gb", description="NVIDIA GB200 (per GPU) 186GB", memory_bytes=189471 * MiB, compute_capability=(10, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=4),
        GpuSpec(name="a100-80gb", description="NVIDIA A100 SXM 80GB", memory_bytes=81920 * MiB, compute_capability=(8, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="a100-40gb", description="NVIDIA A100 SXM 40GB", memory_bytes=40960 * MiB, compute_capability=(8, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="l40s-48gb", description="NVIDIA L40S 48GB", memory_bytes=46068 * MiB, compute_capability=(8, 9), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="l4-24gb", description="NVIDIA L4 24GB", memory_bytes=23034 * MiB, compute_capability=(8, 9), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="a10g-24gb", description="NVIDIA A10G 24GB", memory_bytes=23028 * MiB, compute_capability=(8, 6), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="rtx-4090-24gb", description="NVIDIA GeForce RTX 4090 24GB", memory_bytes=24564 * MiB, compute_capability=(8, 9), cuda_context_bytes=426 * MiB, gpus_per_node=4),
        GpuSpec(name="rtx-6000-ada-48gb", description="NVIDIA RTX 6000 Ada 48GB", memory_bytes=49140 * MiB, compute_capability=(8, 9), cuda_context_bytes=426 * MiB, gpus_per_node=4),
        GpuSpec(name="v100-32gb", description="NVIDIA V100 SXM2 32GB", memory_bytes=32768 * MiB, compute_capability=(7, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="v100-16gb", description="NVIDIA V100 SXM2 16GB", memory_bytes=16384 * MiB, compute_capability=(7, 0), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
        GpuSpec(name="t4-16gb", description="NVIDIA T4 16GB", memory_bytes=15360 * MiB, compute_capability=(7, 5), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=4),
        GpuSpec(name="mi300x-192gb", description="AMD Instinct MI300X 192GB (ROCm)", memory_bytes=192 * GiB, compute_capability=(9, 4), cuda_context_bytes=_DEFAULT_CONTEXT, gpus_per_node=8),
    )
}
DEFAULT_GPU = "h100-80gb"


def lookup_gpu(name: str) -> GpuSpec:
    key = name.lower()
    if key not in GPU_CATALOG:
        raise UsageError(f"unknown GPU {name!r}; choose from {', '.join(GPU_CATALOG)}")
    return GPU_CATALOG[key]


def match_gpu(device_name: str, total_bytes: int | None = None) -> str | None:
    """The catalog key of a GPU as CUDA names it ("NVIDIA H100 80GB HBM3" -> h100-80gb), or None.

    Every word of the key but its memory size ("h100", "pcie") must be a word of the name;
    the key matching most words wins ("H100 PCIe" is h100-pcie-80gb, not h100-80gb), then the
    capacity closest to ``total_bytes`` (A100 40GB vs 80GB)."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    best: tuple[int, int, str] | None = None
    for spec in GPU_CATALOG.values():
        model_words = [w for w in spec.name.split("-") if not re.fullmatch(r"\d+gb", w)]
        if not all(w in words for w in model_words):
            continue
        distance = abs(spec.memory_bytes - total_bytes) if total_bytes else 0
        candidate = (-len(model_words), distance, spec.name)
        if best is None or candidate < best:
            best = candidate
    return best[2] if best else None
