"""What dpplan is asked, declared once: a ``RunSpec`` (the training step) nested in the
plan, profile and worker configs, each validated once, in ``__post_init__``.

``RunSpec`` is what ``dpplan estimate`` plans and ``dpplan profile`` runs: the same flags,
the same defaults, the same names, so every profiled run has its matching estimate. The
three configs add where it runs: ``PlanConfig`` (GPU counts and the catalog GPU, or the
CPU target), ``ProfileConfig`` (the real runs and the batch-size search), ``RunConfig`` (one
run of one strategy, handed to each rank as JSON).

Torch-free: the CLI builds its options from these defaults and validates flags before any
heavy import. The catalogs it checks names against (strategies, GPUs, optimizers, CPU
instruction sets, DeepSpeed's settings) are torch-free leaf modules that import nothing
back from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from dpplan.errors import UsageError
from dpplan.planner.cpu_isa import ISAS
from dpplan.planner.hardware import DEFAULT_GPU, GPU_CATALOG, lookup_gpu
from dpplan.planner.strategies.registry import (
    CONTEXT_PARALLEL_STRATEGIES,
    DEEPSPEED_STAGES,
    EXPERT_PARALLEL_STRATEGIES,
    PIPELINE_PARALLEL_STRATEGIES,
    STRATEGIES,
    TENSOR_PARALLEL_STRATEGIES,
)
from dpplan.planner.strategies.zero_settings import DEFAULT_ZERO, ZeroSettings
from dpplan.training.optimizers import OPTIMIZERS
from dpplan.training.pipeline_layout import SCHEDULES as PP_SCHEDULES
from dpplan.training.pipeline_layout import SPLIT_BACKWARD_SCHEDULES, PipelineLayout, check_layout

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")
OFFLOADS = ("none", "optimizer", "optimizer+params")
PLAN_DEVICES = ("cuda", "cpu")
"""What ``estimate`` plans: GPU memory, or the tensor bytes of a CPU (gloo) run."""
PROFILE_DEVICES = ("auto", "cuda", "cpu")
RUN_DEVICES = ("cpu", "cuda")
DEFAULT_GPU_COUNTS = (1, 2, 4, 8)
DEFAULT_PROFILE_STRATEGIES = ("ddp", "fsdp-full")
MIN_SAMPLE_HZ = 50.0
"""GpuSampler's MIN_RATE_HZ, checked here so that a bad rate is a usage error before any launch
(gpu_sampler.py is imported only on CUDA runs)."""
DEFAULT_HEADROOM_PCT = 10.0
"""Memory kept free: a plan fits, and a micro-batch is recommended, only if its peak is
<= (1 - headroom) x capacity (estimate and profile)."""
DEFAULT_MAX_TRIALS = 4
DEFAULT_TRIAL_STEPS = 2


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)} (got {value!r})")


def _at_least(config, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise UsageError(f"{name} must be >= {low} (got {value})")


def usable_bytes(capacity_bytes: int, headroom_pct: float) -> int:
    """What a rank may use of ``capacity_bytes`` with ``headroom_pct`` kept free: what a plan's
    ``fits`` and ``max_batch_size`` are judged against (profiler/recommend.py ``Limits`` is the
    same rule for a profile's calibrated peaks)."""
    return int(capacity_bytes * (1 - headroom_pct / 100))


def _check_headroom(headroom_pct: float) -> None:
    if not 0 <= headroom_pct < 100:
        raise UsageError(f"headroom_pct must be in [0, 100) (got {headroom_pct})")


def _only_with(strategies: tuple[str, ...], allowed: tuple[str, ...], flag: str, why: str) -> None:
    refused = [s for s in strategies if s not in allowed]
    if refused:
        raise UsageError(f"{flag} {', '.join(allowed)} over the data-parallel ranks, not {', '.join(refused)} ({why})")


def _check_gpu_name(gpu: str | None) -> None:
    if gpu is not None and gpu.lower() not in GPU_CATALOG:
        raise UsageError(f"gpu must be one of {', '.join(GPU_CATALOG)} (got {gpu!r})")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training step: the model and how it is trained. Field meanings match the flags of
    ``dpplan estimate`` and ``dpplan profile`` (cli.run_options)."""

    model: str | None = None
    """``path.py`` or ``path.py:factory``; None is the bundled default model."""
    batch_size: int = 1
    """Micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    activation_checkpointing: bool = False
    offload: str = "none"
    wrap: str | None = None
    """Class name of the FSDP / checkpointing unit; None: children of the largest ModuleList."""
    zero: ZeroSettings = DEFAULT_ZERO
    """DeepSpeed's ZeRO settings for zero1/2/3 (``--deepspeed-config``; default: DeepSpeed's)."""
    tp: int = 1
    """Tensor-parallel degree: each layer split over this many ranks (training/tensor_parallel.py);
    the data-parallel strategy then runs over gpus / tp ranks."""
    sequence_parallel: bool = False
    """With tp > 1: norms and the residual stream split along the sequence too."""
    ep: int = 1
    """Expert-parallel degree: each MoE layer's experts split over this many of the data-parallel
    ranks (training/expert_parallel.py); it divides dp and adds no ranks."""
    pp: int = 1
    """Pipeline stages' ranks: the layers split in order over this many ranks
    (training/pipeline_parallel.py); with pp > 1 ``grad_accum`` is the micro-batches of the
    schedule. gpus = dp x tp x pp."""
    pp_schedule: str = "1f1b"
    """torch's pipeline schedule (training/pipeline_layout.py ``SCHEDULES``)."""
    cp: int = 1
    """Context-parallel degree: each sample's sequence split over this many ranks, attention
    by torch's ring attention (planner/context_parallel.py); planned by rule, GPU targets only.
    gpus = dp x cp x tp."""
    seq_len: int | None = None
    """Tokens per sample, handed to ``example_batch(batch_size, seq_len=...)``; None: the
    model file's own."""

    def __post_init__(self):
        _at_least(self, ("batch_size", "grad_accum", "tp", "ep", "pp", "cp", "seq_len"), 1)
        if self.sequence_parallel and self.tp == 1:
            raise UsageError("sequence parallelism (--sp) needs tensor parallelism (--tp N, N > 1)")
        if self.ep > 1 and self.tp > 1:
            raise UsageError("--ep with --tp is not planned yet: expert parallelism runs over data-parallel ranks only")
        _choice("pp_schedule", self.pp_schedule, PP_SCHEDULES)
        if self.pp > 1:
            if self.ep > 1:
                raise UsageError("--pp with --ep is not planned yet")
            if self.sequence_parallel:
                # the stage boundaries would be sequence-sharded DTensors; dpplan's stage contract
                # passes whole hidden states
                raise UsageError("--pp with --sp is not planned yet (--pp with --tp is)")
            if self.offload != "none":
                raise UsageError("--pp with --offload is not planned yet (offload is DeepSpeed's and FSDP's)")
            check_layout(PipelineLayout(pp=self.pp, schedule=self.pp_schedule, num_micro_batches=self.grad_accum))
        if self.cp > 1:
            if self.pp > 1 or self.ep > 1:
                raise UsageError("--cp with --pp or --ep is not planned yet")
            if self.seq_len is None or self.seq_len % (2 * self.cp):
                # torch's load balancer cuts each sequence into 2 x cp chunks, two per rank
                # (torch/distributed/tensor/experimental/_context_parallel/_load_balancer.py)
                raise UsageError(f"--cp {self.cp} needs --seq-len divisible by 2 x cp = {2 * self.cp} "
                                 f"(got {self.seq_len})")
        _choice("precision", self.precision, PRECISIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("offload", self.offload, OFFLOADS)
        if self.zero.torch_autocast and self.precision not in ("bf16-mixed", "fp16-mixed"):
            raise UsageError("DeepSpeed's torch_autocast needs bf16-mixed or fp16-mixed precision")

    def check_strategies(self, strategies: tuple[str, ...]) -> None:
        """The strategies a config names, against this run (DeepSpeed settings need DeepSpeed)."""
        if not strategies:
            raise UsageError("strategies must name at least one strategy")
        for strategy in strategies:
            _choice("strategy", strategy, STRATEGIES)
        if not self.zero.is_default() and any(s not in DEEPSPEED_STAGES for s in strategies):
            raise UsageError("DeepSpeed settings (--deepspeed-config) apply to zero1, zero2 and zero3 only")
        if self.tp > 1:
            _only_with(strategies, TENSOR_PARALLEL_STRATEGIES, "--tp combines with",
                       "DeepSpeed ZeRO and FSDP1 do not take torch's DTensor tensor-parallel modules, DDP over "
                       "tensor parallelism is not supported by torchtitan or sound in torch 2.13, nn.DataParallel "
                       "is one process")
        if self.cp > 1:
            _only_with(strategies, CONTEXT_PARALLEL_STRATEGIES, "--cp runs beside",
                       "the cp ranks hold the same model and FSDP2 shards it over dp x cp, as torchtitan does")
        if self.pp > 1:
            _only_with(strategies, PIPELINE_PARALLEL_STRATEGIES, "--pp combines with",
                       "torch's PipelineStage drives DDP and FSDP2 itself; FSDP1 and DeepSpeed under a pipeline "
                       "are not planned yet")
            wrapped = [s for s in strategies if s != "single"]
            if self.pp_schedule in SPLIT_BACKWARD_SCHEDULES and wrapped:
                # measured on 2 x 2 gloo ranks: DDP holds 4-9 % more than planned under them, FSDP2
                # 12 % (docs/accuracy_pipeline.md): the wrappers' work at the separate weight step
                raise UsageError(f"--pp-schedule {self.pp_schedule} with {', '.join(wrapped)} is not planned yet (its "
                                 "backward's separate weight step changes the gradient reduction): use --strategy "
                                 "single, or gpipe, 1f1b or interleaved-1f1b")
        if self.ep > 1:
            _only_with(strategies, EXPERT_PARALLEL_STRATEGIES, "--ep runs beside",
                       "each experts module is an FSDP2 unit of its own over the ranks that hold the same experts, "
                       "as torchtitan wraps them")

    def check_world(self, gpus: int) -> None:
        """That ``gpus`` ranks split into tp groups and the data-parallel ranks into ep groups."""
        model_parallel = self.tp * self.pp * self.cp
        if gpus % model_parallel:
            what = " x ".join(f"--{name}" for name in ("tp", "pp", "cp") if getattr(self, name) > 1)
            raise UsageError(f"{what} {model_parallel} does not divide gpus={gpus} "
                             "(gpus = data-parallel ranks x tp x pp x cp)")
        if (gpus // model_parallel) % self.ep:
            raise UsageError(f"--ep {self.ep} does not divide the {gpus // self.tp} data-parallel ranks of "
                             f"gpus={gpus} (expert parallelism takes its ranks from data parallelism)")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunSpec:
        zero = data.get("zero")
        if isinstance(zero, dict):
            zero = ZeroSettings(**{**zero, "hidden_size_auto": tuple(zero.get("hidden_size_auto", ()))})
        return cls(**{**data, "zero": zero if zero is not None else DEFAULT_ZERO})


RUN_FIELDS = tuple(f.name for f in fields(RunSpec))


def _flat_json(config) -> dict:
    """A config as JSON with its RunSpec's fields at the top level: the one flat ``config``
    object of the documents dpplan writes (schema_version 1), whichever config it is."""
    data = {k: v for k, v in asdict(config).items() if k != "run"}
    return {**config.run.to_json(), **data}


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """One planning request (``dpplan estimate``)."""

    run: RunSpec = field(default_factory=RunSpec)
    strategies: tuple[str, ...] = STRATEGIES
    gpus: tuple[int, ...] = DEFAULT_GPU_COUNTS
    """Total ranks (GPUs) to plan for, one estimate per count."""
    nodes: int | None = None
    """Nodes every GPU count spans (``--nodes``); None: gpus / gpus_per_node."""
    gpus_per_node: int | None = None
    """GPUs per node: each GPU count spans gpus / gpus_per_node nodes, one node below that (a
    sweep). None with ``nodes`` None: the GPU's usual node size (hardware.py ``gpus_per_node``,
    8 for an H100) on cuda, and one node for any count on cpu (the CPU ranks of one machine)."""
    gpu: str = DEFAULT_GPU
    device: str = "cuda"
    """cuda: plan GPU memory on ``gpu``; cpu: plan the tensor bytes of a CPU (gloo) run."""
    cpu_isa: str = "native"
    """cpu: the instruction set the CPU kernels are planned for (planner/cpu_isa.py): this CPU's,
    or a lower one (avx2, avx512, avx512-bf16, amx), set before torch starts."""
    capacity_bytes: int | None = None
    """Memory one rank may use, overriding the GPU's (cuda) or host RAM per rank (cpu); what
    ``fits`` and ``max_batch_size`` are judged against, less the headroom. ``dpplan profile
    --gpu-memory`` sets it, and its batch-size search sets it to a calibrated limit."""
    headroom_pct: float = DEFAULT_HEADROOM_PCT
    """Percent of the capacity kept free: an estimate fits when its peak is <= (1 - headroom) x
    capacity, and ``max_batch_size`` is the largest micro-batch that does (``--headroom``)."""

    def __post_init__(self):
        self.run.check_strategies(self.strategies)
        if not self.gpus or any(g < 1 for g in self.gpus):
            raise UsageError(f"gpus must be positive integers (got {self.gpus})")
        _at_least(self, ("nodes", "gpus_per_node", "capacity_bytes"), 1)
        _check_headroom(self.headroom_pct)
        _choice("device", self.device, PLAN_DEVICES)
        if self.run.cp > 1 and self.device != "cuda":
            raise UsageError("--cp plans GPUs only: torch's ring attention has no CPU kernel (no sharding rule "
                             "for the CPU attention op)")
        _check_gpu_name(self.gpu)
        if self.nodes is not None and self.gpus_per_node is not None:
            raise UsageError("give either nodes or gpus_per_node, not both")
        node_size = self.node_size()
        for gpus in self.gpus:
            if node_size is not None and gpus > node_size and gpus % node_size:
                if self.gpus_per_node is None:  # the catalog's node size, not the user's
                    raise UsageError(
                        f"gpus={gpus} does not fill whole nodes of {node_size} GPUs ({self.gpu}'s usual node, "
                        "dpplan gpus): give --gpus-per-node or --nodes")
                raise UsageError(f"gpus={gpus} is not a multiple of gpus_per_node={node_size}")
            if gpus % self.nodes_for(gpus):
                raise UsageError(f"gpus={gpus} does not split evenly into nodes={self.nodes}")
            self.run.check_world(gpus)
        _choice("cpu_isa", self.cpu_isa, tuple(ISAS))
        if self.cpu_isa != "native" and self.device != "cpu":
            raise UsageError("cpu_isa applies to the cpu device only (the GPU's kernels are planned for the GPU)")

    def node_size(self) -> int | None:
        """GPUs per node of a sweep: ``gpus_per_node``, else the GPU's usual node (cuda); None
        when ``nodes`` is given, and on cpu (one node)."""
        if self.gpus_per_node is not None or self.nodes is not None:
            return self.gpus_per_node
        return lookup_gpu(self.gpu).gpus_per_node if self.device == "cuda" else None

    def nodes_for(self, gpus: int) -> int:
        """Nodes that ``gpus`` ranks span."""
        if self.nodes is not None:
            return self.nodes
        node_size = self.node_size()
        return 1 if node_size is None else max(1, gpus // node_size)

    def to_json(self) -> dict:
        return {**_flat_json(self), "strategies": list(self.strategies), "gpus": list(self.gpus)}

    @classmethod
    def from_json(cls, data: dict) -> PlanConfig:
        """Back from ``to_json()`` (a saved plan's ``config``), validated as when it was made."""
        run = RunSpec.from_json({k: v for k, v in data.items() if k in RUN_FIELDS})
        rest = {k: v for k, v in data.items() if k not in RUN_FIELDS}
        tuples = {k: tuple(rest[k]) for k in ("strategies", "gpus") if k in rest}
        if rest.get("gpus_per_node") is not None:
            rest["nodes"] = None  # plans saved before nodes could be None wrote 1 beside gpus_per_node
        # a plan saved before the headroom was planned judged fits against the whole capacity
        return cls(run=run, **{"headroom_pct": 0.0, **rest, **tuples})


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """One profiling request (``dpplan profile``)."""

    run: RunSpec = field(default_factory=RunSpec)
    strategies: tuple[str, ...] = DEFAULT_PROFILE_STRATEGIES
    gpus: int | None = None
    """Total ranks over all nodes (as ``estimate --gpus``); None: every visible GPU on each
    node, or target.DEFAULT_CPU_RANKS CPU ranks without GPUs (profiler/target.py)."""
    nodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    steps: int | None = None
    """Timed optimizer steps per run; None: profile.DEFAULT_GPU_STEPS on GPUs, DEFAULT_CPU_STEPS
    on CPU ranks (a CPU step of a mid-sized model in bf16 takes tens of seconds; the memory peak
    is the same in every step after the warm-up, so fewer steps lose no accuracy there)."""
    warmup_steps: int = 1
    sample_hz: float = 100.0
    timeout_s: float = 600.0
    """Wall-clock limit of one run (launch to last rank), seconds."""
    device: str = "auto"
    """auto: GPUs when CUDA sees any, else CPU ranks (gloo); cuda or cpu to force one."""
    gpu: str | None = None
    """Catalog key for the estimates; None: the detected GPU."""
    out_dir: str | None = None
    """None: a new timestamped folder under ./dpplan-runs/."""
    gpu_memory_bytes: int | None = None
    """Memory per rank to plan and test against (a smaller card on a big one); None: the GPU's
    own (cuda), host RAM per rank (cpu). On cuda each run is capped to it."""
    headroom_pct: float = DEFAULT_HEADROOM_PCT
    find_batch_size: bool = False
    """Confirm the recommended micro-batch with trial jobs (else it is predicted only)."""
    max_trials: int = DEFAULT_MAX_TRIALS
    """Trial jobs per strategy at most."""
    trial_steps: int = DEFAULT_TRIAL_STEPS
    """Timed steps of a trial, after at least one warm-up step."""

    def __post_init__(self):
        self.run.check_strategies(self.strategies)
        _choice("device", self.device, PROFILE_DEVICES)
        if self.run.cp > 1:
            raise UsageError("--cp is planned (dpplan estimate), not run for real yet")
        _at_least(self, ("steps", "nodes", "gpus", "gpu_memory_bytes", "max_trials", "trial_steps"), 1)
        _at_least(self, ("warmup_steps",), 0)
        if self.gpus is not None and self.gpus % self.nodes:
            raise UsageError(f"gpus={self.gpus} (total over all nodes) does not split evenly into nodes={self.nodes}")
        if self.gpus is not None:
            self.run.check_world(self.gpus)
        if not 0 <= self.node_rank < self.nodes:
            raise UsageError(f"node_rank must be in 0..{self.nodes - 1} (got {self.node_rank})")
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise UsageError("nodes > 1 needs rdzv_endpoint (host:port of node 0)")
        if self.sample_hz < MIN_SAMPLE_HZ:
            raise UsageError(f"sample_hz must be >= {MIN_SAMPLE_HZ:g} (got {self.sample_hz})")
        if self.timeout_s <= 0:
            raise UsageError(f"timeout_s must be > 0 (got {self.timeout_s})")
        _check_gpu_name(self.gpu)
        _check_headroom(self.headroom_pct)
        if self.find_batch_size and self.nodes > 1:
            # A trial is launched from this node only; the other nodes would never join it.
            raise UsageError("find_batch_size runs on one node only (nodes=1)")

    def to_json(self) -> dict:
        return {**_flat_json(self), "strategies": list(self.strategies)}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What one real run does (profiler/worker.py, on every rank)."""

    run: RunSpec
    strategy: str
    nodes: int = 1
    steps: int = 3
    """Timed optimizer steps, after the warm-up; peaks and step times are over these."""
    warmup_steps: int = 1
    """Untimed optimizer steps first (the first creates the optimizer state)."""
    device: str = "cpu"
    """cpu: gloo, CPU tensors; cuda: nccl, one GPU per process (LOCAL_RANK)."""
    sample_hz: float = 100.0
    """NVML sampling rate on cuda."""
    memory_limit_bytes: int | None = None
    """cuda: cap this process's allocator to that many bytes of its GPU
    (torch.cuda.set_per_process_memory_fraction), to test a smaller card on a bigger one."""
    seed: int = 0
    keep_allocations: bool = False
    """Also write every allocation event (cpu; for investigating a mismatch)."""

    def __post_init__(self):
        self.run.check_strategies((self.strategy,))
        _at_least(self, ("steps", "nodes", "memory_limit_bytes"), 1)
        _at_least(self, ("warmup_steps",), 0)
        _choice("device", self.device, RUN_DEVICES)

    def to_json(self) -> dict:
        return _flat_json(self)

    @classmethod
    def from_json(cls, data: dict) -> RunConfig:
        """Back from ``to_json()`` (how the launcher hands the run to each rank)."""
        run = RunSpec.from_json({k: v for k, v in data.items() if k in RUN_FIELDS})
        return cls(run=run, **{k: v for k, v in data.items() if k not in RUN_FIELDS})
