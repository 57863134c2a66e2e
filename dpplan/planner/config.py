"""PlanConfig: everything ``dpplan estimate`` is asked, validated once, written into every output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dpplan.errors import UsageError
from dpplan.planner.cpu_isa import ISAS
from dpplan.planner.hardware import DEFAULT_GPU, GPU_CATALOG
from dpplan.planner.optimizers import OPTIMIZERS
from dpplan.planner.strategies.registry import DEEPSPEED_STAGES, STRATEGIES
from dpplan.planner.strategies.zero_settings import DEFAULT_ZERO, ZeroSettings

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")
OFFLOADS = ("none", "optimizer", "optimizer+params")
DEVICES = ("cuda", "cpu")
DEFAULT_GPU_COUNTS = (1, 2, 4, 8)


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)} (got {value!r})")


def check_run_settings(config) -> None:
    """The run-describing fields that ``estimate`` and ``profile`` share (one set of flags, see
    cli.run_options), checked the same way for PlanConfig and ProfileConfig."""
    if not config.strategies:
        raise UsageError("strategies must name at least one strategy")
    for strategy in config.strategies:
        _choice("strategy", strategy, STRATEGIES)
    for name in ("batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise UsageError(f"{name} must be >= 1 (got {getattr(config, name)})")
    _choice("precision", config.precision, PRECISIONS)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("offload", config.offload, OFFLOADS)
    if not config.zero.is_default() and any(s not in DEEPSPEED_STAGES for s in config.strategies):
        raise UsageError("DeepSpeed settings (--deepspeed-config) apply to zero1, zero2 and zero3 only")
    if config.zero.torch_autocast and config.precision not in ("bf16-mixed", "fp16-mixed"):
        raise UsageError("DeepSpeed's torch_autocast needs bf16-mixed or fp16-mixed precision")


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """One planning request. Field meanings match the ``dpplan estimate`` flags."""

    model: str | None = None
    """``path.py`` or ``path.py:factory``; None is the bundled default model."""
    strategies: tuple[str, ...] = STRATEGIES
    gpus: tuple[int, ...] = DEFAULT_GPU_COUNTS
    """Total ranks (GPUs) to plan for, one estimate per count."""
    nodes: int = 1
    gpus_per_node: int | None = None
    """When set, each GPU count spans gpus / gpus_per_node nodes (a sweep); else ``nodes``."""
    batch_size: int = 1
    """Micro-batch per rank."""
    grad_accum: int = 1
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    activation_checkpointing: bool = False
    offload: str = "none"
    wrap: str | None = None
    """Class name of the FSDP / checkpointing unit; None: children of the largest ModuleList."""
    gpu: str = DEFAULT_GPU
    device: str = "cuda"
    """cuda: plan GPU memory on ``gpu``; cpu: plan the tensor bytes of a CPU (gloo) run."""
    cpu_isa: str = "native"
    """cpu: the instruction set the CPU kernels are planned for (planner/cpu_isa.py): this CPU's,
    or a lower one (avx2, avx512, avx512-bf16, amx), set before torch starts."""
    capacity_bytes: int | None = None
    """Memory one rank may use, overriding the GPU's (cuda) or host RAM per rank (cpu); what
    ``fits`` and ``max_batch_size`` are judged against. ``dpplan profile --gpu-memory`` sets
    it, and its batch-size search sets it to a calibrated limit."""
    zero: ZeroSettings = DEFAULT_ZERO
    """DeepSpeed's ZeRO settings for zero1/2/3 (``--deepspeed-config``; default: DeepSpeed's)."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        check_run_settings(self)
        if not self.gpus or any(g < 1 for g in self.gpus):
            raise UsageError(f"gpus must be positive integers (got {self.gpus})")
        if self.nodes < 1:
            raise UsageError(f"nodes must be >= 1 (got {self.nodes})")
        if self.gpus_per_node is not None:
            if self.gpus_per_node < 1:
                raise UsageError(f"gpus_per_node must be >= 1 (got {self.gpus_per_node})")
            if self.nodes != 1:
                raise UsageError("give either nodes or gpus_per_node, not both")
            for gpus in self.gpus:
                if gpus > self.gpus_per_node and gpus % self.gpus_per_node:
                    raise UsageError(f"gpus={gpus} is not a multiple of gpus_per_node={self.gpus_per_node}")
        for gpus in self.gpus:
            if gpus % self.nodes_for(gpus):
                raise UsageError(f"gpus={gpus} does not split evenly into nodes={self.nodes}")
        _choice("device", self.device, DEVICES)
        _choice("cpu_isa", self.cpu_isa, tuple(ISAS))
        if self.cpu_isa != "native" and self.device != "cpu":
            raise UsageError("cpu_isa applies to the cpu device only (the GPU's kernels are planned for the GPU)")
        if self.capacity_bytes is not None and self.capacity_bytes < 1:
            raise UsageError(f"capacity_bytes must be >= 1 (got {self.capacity_bytes})")
        if self.gpu.lower() not in GPU_CATALOG:
            raise UsageError(f"gpu must be one of {', '.join(GPU_CATALOG)} (got {self.gpu!r})")

    def nodes_for(self, gpus: int) -> int:
        """Nodes that ``gpus`` ranks span."""
        if self.gpus_per_node is not None:
            return max(1, gpus // self.gpus_per_node)
        return self.nodes

    def to_json(self) -> dict:
        data = asdict(self)
        data["strategies"] = list(self.strategies)
        data["gpus"] = list(self.gpus)
        return data
