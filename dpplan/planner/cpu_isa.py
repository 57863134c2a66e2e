"""Which x86 instruction set the CPU target is planned for: this CPU's, or a lower one.

oneDNN and ATen choose their CPU kernels (and so the buffers the CPU target measures,
planner/cpu_kernels.py) for the instruction set they find when torch starts. Both take a cap
from the environment, read once at start: ``ONEDNN_MAX_CPU_ISA`` (oneDNN's dispatcher,
https://oneapi-src.github.io/oneDNN/dev_guide_cpu_dispatcher_control.html) and
``ATEN_CPU_CAPABILITY`` (aten/src/ATen/native/DispatchStub.cpp). ``--cpu-isa`` sets both before
torch is imported, so every kernel, and every probe of it, chooses as on that CPU. A cap can
only lower the set this CPU has: planning for AMX needs an AMX machine.

This module does not import torch (the CLI calls ``apply`` before torch loads).
"""

from __future__ import annotations

import os
import sys

from dpplan.errors import UsageError

ISAS = {
    # name: (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY)
    "native": (None, None),
    "avx2": ("AVX2", "avx2"),
    "avx512": ("AVX512_CORE", "avx512"),
    "avx512-bf16": ("AVX512_CORE_BF16", "avx512"),
    "amx": ("AVX512_CORE_AMX", "avx512"),
}
"""``--cpu-isa`` values, lowest first after native."""

ENVIRONMENT = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def environment_for(isa: str) -> dict[str, str]:
    return {name: value for name, value in zip(ENVIRONMENT, ISAS[isa]) if value is not None}


def apply(isa: str) -> None:
    """Set the caps for ``isa`` in this process (and the ranks it starts). Must run before torch
    is imported: torch reads them once."""
    wanted = environment_for(isa)
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    if "torch" in sys.modules:
        raise UsageError(
            f"cpu_isa={isa} must be chosen before torch is imported (set "
            + " ".join(f"{k}={v}" for k, v in wanted.items()) + " in the environment, or use dpplan's --cpu-isa)"
        )
    os.environ.update(wanted)


def check_supported(isa: str) -> None:
    """Refuse an instruction set above this CPU's (oneDNN would silently plan for less)."""
    import torch

    has = {
        "avx2": torch.cpu._is_avx2_supported,
        "avx512": torch.cpu._is_avx512_supported,
        "avx512-bf16": torch.cpu._is_avx512_bf16_supported,
        "amx": torch.cpu._is_amx_tile_supported,
    }
    if isa != "native" and not has[isa]():
        raise UsageError(f"this CPU has no {isa}: the CPU target can be planned for this CPU's instruction set or a lower one")


def active() -> str:
    """The ``--cpu-isa`` name the environment's caps stand for ("native" without caps)."""
    current = tuple(os.environ.get(k) for k in ENVIRONMENT)
    for name, caps in ISAS.items():
        if caps == current:
            return name
    return "custom: " + " ".join(f"{k}={v}" for k, v in zip(ENVIRONMENT, current) if v)
