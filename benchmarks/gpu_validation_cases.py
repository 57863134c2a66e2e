"""The GPU validation cases (issue 17): what each runs, its exact command, and how its
result becomes predicted-against-measured quantities. benchmarks/gpu_validation.py runs them.

Four kinds of case, each one command in a fresh process:
  runtime       benchmarks/gpu_runtime_probe.py: the CUDA context and cuBLAS workspace alone,
                against the GPU catalog (dpplan/planner/hardware.py, gpu_overheads.py).
  profile       ``dpplan profile --gpus 1 --strategy S ...``: one real run, its measured
                peaks (torch.cuda.max_memory_allocated / max_memory_reserved, NVML used)
                against the same profile's estimate (peak_allocated_bytes /
                peak_reserved_bytes / peak_bytes).
  oom_boundary  ``dpplan profile ... --gpu-memory SIZE --headroom 0 --find-batch-size``: each
                rank capped with torch.cuda.set_per_process_memory_fraction, trial jobs find
                the largest micro-batch that runs within SIZE, against the planner's
                ``max_batch_size`` for SIZE.
  sampler       benchmarks/sampler_overhead.py: the 100 Hz NVML sampler's step-time overhead.

The dry run (``--dry-run``) runs the same cases on CPU ranks (``--device cpu``), where only
tensor bytes exist: reserved, NVML and the runtime probe are recorded as "n/a on CPU". It keeps
CPU steps short: the bundled GPT at ``--seq-len 64``, one timed step, and a planning capacity
(``--gpu-memory``) so that the recommendations' estimates stay at small batches.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from dpplan.planner.gpu_overheads import cublas_workspace_bytes
from dpplan.planner.hardware import GiB, GpuSpec

KINDS = ("runtime", "profile", "oom_boundary", "sampler")
NOT_ON_CPU = "n/a on CPU"

# Issue 17's targets, once measured on a GPU.
ALLOCATED_TARGET_PCT = 1.0
RESERVED_TARGET_PCT = 5.0
NVML_TARGET_PCT = 5.0
NVML_TARGET_BYTES = GiB // 2
BATCH_TARGET = 1
"""The OOM boundary at the predicted micro-batch +- 1."""
SAMPLER_TARGET_PCT = 1.0
"""benchmarks/sampler_overhead.py's TARGET_OVERHEAD_PCT (issue 3): < 1 % slower median step."""

DRY_RUN_SEQ_LEN = 64
DRY_RUN_CAPACITY = "2GiB"
"""CPU ranks: a planning capacity only (nothing caps a CPU process); it keeps the
recommendations' CPU-kernel probes at small batches (host RAM would put them at hundreds)."""
OOM_CAPACITY_GPU = "8GiB"
OOM_CAPACITY_CPU = "800MB"
"""The bundled GPT's predicted boundary under these (fp32, the case's settings): micro-batch 74
on an H100 (sequence 256), 14 on CPU ranks (sequence 64)."""
OOM_MAX_TRIALS = 6
SAMPLER_SECONDS_GPU = 6
SAMPLER_SECONDS_CPU = 2


@dataclass(frozen=True, kw_only=True)
class Case:
    id: str
    """Short unique name (``--only`` selects by it)."""
    kind: str
    title: str
    model: str | None = None
    """A model file relative to the repository root; None: the bundled GPT."""
    strategy: str = "single"
    precision: str = "bf16-mixed"
    batch_size: int = 8
    dry_run_batch_size: int = 2
    """The micro-batch on CPU ranks, where a step of the bundled GPT at 8 x 64 tokens costs about
    a second of one core per step and CPU-kernel probe (the dry run's budget is CPU time)."""
    activation_checkpointing: bool = False
    expected_gpu_s: float = 30.0
    """Wall time on one H100, start-up included: a guess until a GPU has run the kit (then the
    newest result's durations are used, gpu_validation.previous_durations)."""
    expected_cpu_s: float = 20.0
    """The same for the dry run on an idle 2-core machine: about the CPU seconds the case's
    processes used on the shared one (13.6 to 18.3 s for the bundled GPT's first cases)."""
    needs: tuple[str, ...] = ()
    """Python packages the case needs; missing: skipped with the reason."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)} (got {self.kind!r})")

    def expected_s(self, dry_run: bool) -> float:
        return self.expected_cpu_s if dry_run else self.expected_gpu_s

    def batch(self, dry_run: bool) -> int:
        return self.dry_run_batch_size if dry_run else self.batch_size

    def settings(self, dry_run: bool) -> dict:
        if self.kind in ("runtime", "sampler"):
            return {}
        return {"model": self.model or "bundled GPT (dpplan/models/default_gpt.py)", "strategy": self.strategy,
                "precision": self.precision, "batch_size": self.batch(dry_run),
                "activation_checkpointing": self.activation_checkpointing, "gpus": 1}

    def argv(self, *, dry_run: bool, out_dir: Path) -> list[str]:
        """The command, after the python executable; paths relative to the repository root."""
        if self.kind == "runtime":
            return ["benchmarks/gpu_runtime_probe.py"]
        if self.kind == "sampler":
            seconds = SAMPLER_SECONDS_CPU if dry_run else SAMPLER_SECONDS_GPU
            # One intra-op thread, as every rank the sampler runs beside (profile.profile_one sets
            # OMP_NUM_THREADS=1): the sampler thread then competes with the one thread it would.
            return ["benchmarks/sampler_overhead.py", "--seconds", str(seconds), "--threads", "1"]
        argv = ["-m", "dpplan.cli", "profile"] + ([self.model] if self.model else [])
        argv += ["--gpus", "1", "--strategy", self.strategy, "--precision", self.precision,
                 "--batch-size", str(self.batch(dry_run))]
        if self.activation_checkpointing:
            argv.append("--activation-checkpointing")
        if dry_run:
            argv += ["--device", "cpu", "--steps", "1"]
            if self.model is None:
                argv += ["--seq-len", str(DRY_RUN_SEQ_LEN)]
        else:
            argv += ["--device", "cuda"]
        if self.kind == "oom_boundary":
            argv += ["--gpu-memory", OOM_CAPACITY_CPU if dry_run else OOM_CAPACITY_GPU, "--headroom", "0",
                     "--find-batch-size", "--max-trials", str(OOM_MAX_TRIALS), "--trial-steps", "1"]
        elif dry_run:
            argv += ["--gpu-memory", DRY_RUN_CAPACITY]
        return argv + ["--out", str(out_dir)]


def command_line(argv: list[str]) -> str:
    """The case's command as one shell line, ``python`` standing for the interpreter that ran it."""
    return shlex.join(["python", *argv])


def cases() -> list[Case]:
    """Priority order: the cheapest, most informative first (the budget guard cuts from the end)."""
    zoo = "benchmarks/models"
    return [
        Case(id="runtime", kind="runtime", title="CUDA context and cuBLAS workspace, alone",
             expected_gpu_s=20, expected_cpu_s=0),
        Case(id="single-fp32", kind="profile", title="bundled GPT, single, fp32", precision="fp32"),
        Case(id="single-bf16", kind="profile", title="bundled GPT, single, bf16-mixed"),
        Case(id="fsdp2-bf16", kind="profile", title="bundled GPT, FSDP2 on 1 rank, bf16-mixed", strategy="fsdp2"),
        *(Case(id=f"{stage}-bf16", kind="profile", title=f"bundled GPT, DeepSpeed {stage} on 1 rank, bf16-mixed",
               strategy=stage, expected_gpu_s=45, expected_cpu_s=25, needs=("deepspeed",))
          for stage in ("zero1", "zero2", "zero3")),
        Case(id="single-bf16-ac", kind="profile", title="bundled GPT, single, bf16-mixed, checkpointing",
             activation_checkpointing=True),
        Case(id="single-bf16-b32", kind="profile", title="bundled GPT, single, bf16-mixed, micro-batch 32",
             batch_size=32, dry_run_batch_size=8, expected_cpu_s=25),
        Case(id="llama-bf16", kind="profile", title="zoo Llama (GQA, RoPE), single, bf16-mixed",
             model=f"{zoo}/llama.py"),
        Case(id="resnet-fp32", kind="profile", title="zoo ResNet (convolutions), single, fp32",
             model=f"{zoo}/resnet.py", precision="fp32"),
        Case(id="sampler", kind="sampler", title="100 Hz NVML sampler's step-time overhead",
             expected_gpu_s=20, expected_cpu_s=10),
        Case(id="oom-boundary", kind="oom_boundary", title="OOM boundary, bundled GPT, single (allocator capped)",
             precision="fp32", batch_size=4, expected_gpu_s=100, expected_cpu_s=45),
    ]


@dataclass(frozen=True, kw_only=True)
class Quantity:
    """One predicted-against-measured number of a case."""

    name: str
    unit: str
    """bytes | batches | pct"""
    predicted: float | int | None
    measured: float | int | None
    target: str | None
    """The target in words; None: recorded for information (a term, not a target)."""
    within_target: bool | None = None
    """None: not compared (n/a, or nothing measured)."""
    note: str | None = None
    error_pct: float | None = field(init=False, default=None)
    error: float | int | None = field(init=False, default=None)
    """predicted - measured, in ``unit``."""

    def __post_init__(self):
        if self.predicted is not None and self.measured is not None:
            object.__setattr__(self, "error", self.predicted - self.measured)
            if self.measured and self.unit == "bytes":
                object.__setattr__(self, "error_pct", 100.0 * (self.predicted - self.measured) / self.measured)

    def to_json(self) -> dict:
        return {"name": self.name, "unit": self.unit, "predicted": self.predicted, "measured": self.measured,
                "error": self.error, "error_pct": self.error_pct, "target": self.target,
                "within_target": self.within_target, "note": self.note}


def _pct_quantity(name: str, predicted: int | None, measured: int | None, target_pct: float | None,
                  *, or_bytes: int | None = None, note: str | None = None) -> Quantity:
    within = None
    target = None
    if target_pct is not None:
        target = f"within {target_pct:g} %" + (f" or {or_bytes / GiB:g} GiB" if or_bytes else "")
        if predicted is not None and measured:
            gap = abs(predicted - measured)
            within = 100.0 * gap / measured <= target_pct or (or_bytes is not None and gap <= or_bytes)
    return Quantity(name=name, unit="bytes", predicted=predicted, measured=measured, target=target,
                    within_target=within, note=note)


def not_on_cpu(name: str, unit: str = "bytes") -> Quantity:
    return Quantity(name=name, unit=unit, predicted=None, measured=None, target=None, note=NOT_ON_CPU)


def profile_quantities(run: dict, device: str) -> list[Quantity]:
    """A profile.json run (status ok) as quantities: allocated, reserved, NVML, and the two gaps
    between them (the allocator's slack, and what sits outside the allocator)."""
    estimate, measured = run.get("estimate") or {}, run.get("measured") or {}
    if device != "cuda":
        # On CPU ranks the estimate's three peaks are one number, the live tensor bytes.
        return [
            _pct_quantity("allocated", estimate.get("peak_bytes"), measured.get("peak_allocated_bytes"),
                          ALLOCATED_TARGET_PCT, note="tensor bytes of a CPU rank"),
            not_on_cpu("reserved"), not_on_cpu("nvml"), not_on_cpu("allocator_slack"), not_on_cpu("outside_allocator"),
        ]
    allocated, reserved, device_bytes = (estimate.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes",
                                                                    "peak_bytes"))
    nvml = measured.get("peak_nvml_bytes")
    return [
        _pct_quantity("allocated", allocated, measured.get("peak_allocated_bytes"), ALLOCATED_TARGET_PCT),
        _pct_quantity("reserved", reserved, measured.get("peak_reserved_bytes"), RESERVED_TARGET_PCT),
        _pct_quantity("nvml", device_bytes, nvml, NVML_TARGET_PCT, or_bytes=NVML_TARGET_BYTES,
                      note=None if nvml is not None else (measured.get("per_rank") or [{}])[0].get("nvml_notice")),
        _pct_quantity("allocator_slack", _gap(reserved, allocated), measured.get("allocator_cache_bytes"), None,
                      note="reserved - allocated: block rounding and segment slack"),
        _pct_quantity("outside_allocator", _gap(device_bytes, reserved), measured.get("non_pytorch_bytes"), None,
                      note="NVML used - reserved: CUDA context, NCCL, lazily loaded kernels"),
    ]


def _gap(high: int | None, low: int | None) -> int | None:
    return None if high is None or low is None else high - low


def runtime_quantities(probe: dict, gpu: GpuSpec) -> list[Quantity]:
    """The probe's measurement against the catalog entry the estimates use for this GPU."""
    context = probe.get("cuda_context_bytes")
    return [
        _pct_quantity("cuda_context", gpu.cuda_context_bytes, context, NVML_TARGET_PCT, or_bytes=NVML_TARGET_BYTES,
                      note=f"after GEMMs (lazy loading); right after initialisation: "
                           f"{probe.get('cuda_context_after_init_bytes')} bytes"),
        _pct_quantity("cublas_workspace", cublas_workspace_bytes(gpu), probe.get("cublas_workspace_bytes"),
                      ALLOCATED_TARGET_PCT,
                      note=f"fp32 GEMM alone: {probe.get('cublas_workspace_fp32_bytes')} bytes; "
                           "with a bf16 linear (cuBLASLt) as well: measured"),
    ]


def oom_quantities(document: dict) -> list[Quantity]:
    """The confirmed largest micro-batch against the planner's prediction for the capacity."""
    runs = document.get("runs") or []
    predicted = (runs[0].get("estimate") or {}).get("max_batch_size") if runs else None
    recommendation = ((document.get("recommendations") or {}).get("strategies") or [None])[0]
    if recommendation is None:
        return [Quantity(name="largest_micro_batch", unit="batches", predicted=predicted, measured=None,
                         target=f"+-{BATCH_TARGET}", note="no recommendation was written")]
    search = recommendation.get("search") or {}
    measured = recommendation.get("batch_size")
    converged = bool(search.get("converged"))
    within = abs(predicted - measured) <= BATCH_TARGET if converged and predicted is not None and measured is not None \
        else None
    trials = ", ".join(f"b{t['batch_size']} {t['status']}" for t in search.get("trials") or ())
    note = (f"{search.get('num_trials', 0)} trials ({trials}); {search.get('stop_reason')}; "
            f"calibrated first trial b{recommendation.get('predicted_batch_size')}")
    return [Quantity(name="largest_micro_batch", unit="batches", predicted=predicted, measured=measured,
                     target=f"+-{BATCH_TARGET}", within_target=within, note=note)]


def sampler_quantities(report: dict) -> list[Quantity]:
    overhead = report.get("overhead_pct")
    return [Quantity(
        name="sampler_step_overhead", unit="pct", predicted=None, measured=overhead,
        target=f"< {SAMPLER_TARGET_PCT:g} %", within_target=None if overhead is None else overhead < SAMPLER_TARGET_PCT,
        note=f"NVML {report.get('nvml')}; paired median ratio {report.get('paired_median_ratio')}; "
             f"sampler thread {report.get('sampler_cpu_pct_of_core')} % of one core",
    )]
