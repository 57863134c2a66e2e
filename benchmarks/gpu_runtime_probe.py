"""The CUDA context and the cuBLAS workspace of one process, measured on their own (GPU only).

    python benchmarks/gpu_runtime_probe.py          # prints one JSON object; exit 2 without a CUDA GPU

These are the two per-GPU terms dpplan adds that no trace contains
(dpplan/planner/gpu_overheads.py, dpplan/planner/hardware.py): the driver's context, which only
NVML sees, and cuBLAS's workspace, which torch allocates through its caching allocator once per
(handle, stream) and keeps. benchmarks/gpu_validation.py runs this first, in a fresh process on
an otherwise idle GPU, and compares it with the catalog's ``cuda_context_bytes`` and
``cublas_workspace_bytes``.

How each is measured:
  context    NVML "used" (memory v2, the whole device) after CUDA is initialised, minus the
             reading before this process touched CUDA, minus what torch's allocator reserved
             (``memory_reserved``). Read twice: right after initialisation, and after GEMMs
             have run, because with lazy module loading (CUDA_MODULE_LOADING=LAZY, torch's
             default) kernels load into the context when first launched.
  workspace  ``memory_allocated`` growth over a first fp32 matmul (cuBLAS) and a first bf16
             linear with bias (cuBLASLt), inputs kept, outputs freed: what stays allocated is
             the workspace(s) the handle pool keeps.
NVML readings reuse the profiler's sampler (dpplan/profiler/gpu_sampler.py: v2 where the
driver has it), each the largest of a few samples over SETTLE_S.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpplan.profiler.gpu_sampler import GpuSampler  # noqa: E402

NO_GPU_EXIT = 2
SETTLE_S = 0.2
"""How long each NVML reading samples (at the sampler's 100 Hz): the driver updates "used" at
once, the few samples only guard against a read that fails."""
GEMM_SIZE = 1024
"""Square GEMM operands: large enough that cuBLAS takes its regular (workspace-using) path."""


def nvml_used_bytes() -> tuple[int | None, str | None]:
    """(NVML used bytes of local device 0 now, notice): the largest of a few samples."""
    sampler = GpuSampler(local_rank=0).start()
    time.sleep(SETTLE_S)
    samples = sampler.stop()
    if not samples:
        return None, sampler.notice or "NVML gave no sample"
    return max(s.used_bytes for s in samples), sampler.notice


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return str(pynvml.nvmlSystemGetDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no pynvml: the version is detail, not a failure
        return None


def measure() -> dict:
    import torch
    import torch.nn.functional as F

    before, notice = nvml_used_bytes()  # before this process makes a CUDA context
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.cuda.init()
    torch.empty(1, device=device)  # the context exists once memory is allocated on it
    torch.cuda.synchronize(device)
    after_init, _ = nvml_used_bytes()
    reserved_init = torch.cuda.memory_reserved(device)

    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device)
    x16, w16 = a.bfloat16(), b.bfloat16()
    bias16 = torch.zeros(GEMM_SIZE, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    inputs_allocated = torch.cuda.memory_allocated(device)
    out = a @ b  # fp32 GEMM: cuBLAS's handle and its workspace
    torch.cuda.synchronize(device)
    del out
    after_fp32 = torch.cuda.memory_allocated(device) - inputs_allocated
    out = F.linear(x16, w16, bias16)  # bf16 addmm with bias: the cuBLASLt path
    torch.cuda.synchronize(device)
    del out
    after_bf16 = torch.cuda.memory_allocated(device) - inputs_allocated
    torch.cuda.synchronize(device)
    after_gemm, _ = nvml_used_bytes()
    reserved_gemm = torch.cuda.memory_reserved(device)

    properties = torch.cuda.get_device_properties(device)

    def context(used: int | None, reserved: int) -> int | None:
        return None if used is None or before is None else used - before - reserved

    return {
        "gpu_name": properties.name,
        "gpu_total_bytes": properties.total_memory,
        "compute_capability": [properties.major, properties.minor],
        "driver_version": driver_version(),
        "cuda_version": torch.version.cuda,
        "torch_version": torch.__version__,
        "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING", "(unset: torch sets LAZY)"),
        "nvml_notice": notice,
        "nvml_used_before_bytes": before,
        "nvml_used_after_init_bytes": after_init,
        "nvml_used_after_gemm_bytes": after_gemm,
        "reserved_after_init_bytes": reserved_init,
        "reserved_after_gemm_bytes": reserved_gemm,
        "cuda_context_after_init_bytes": context(after_init, reserved_init),
        "cuda_context_bytes": context(after_gemm, reserved_gemm),
        "cublas_workspace_fp32_bytes": after_fp32,
        "cublas_workspace_bytes": after_bf16,
    }


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch: the context and cuBLAS workspace exist only on a GPU", file=sys.stderr)
        return NO_GPU_EXIT
    print(json.dumps(measure()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
