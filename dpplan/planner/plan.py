"""What a plan says: the records ``estimate.py`` returns, and plan.json, the ``PlanDocument``
the reports draw (the terminal table, the HTML page) and ``dpplan report`` reads back.

Torch-free on purpose: reading a saved plan or profile back (``dpplan report``, the profile's
``from_json``) needs these records, not the tracer behind them.

Schema of plan.json (``schema_version`` 1; scripts depend on these names: add fields freely,
rename or remove only with a new version), ``PlanDocument.to_json()``:
  {schema_version, kind: "estimate", tool {name, version}, created, command, config (the
   PlanConfig, RunSpec fields at the top level), model (ModelSummary), estimates: [StrategyEstimate...],
   unsupported {strategy: reason}, recommendation (PlanRecommendation; null: nothing planned, or
   a plan saved before it was recorded), cpu_kernels (cpu target; else null)}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum

from dpplan.config import PlanConfig
from dpplan.json_file import SCHEMA_VERSION, TOOL_NAME, known_fields

KIND = "estimate"


@dataclass(frozen=True, kw_only=True)
class ModuleActivation:
    name: str
    class_name: str
    activation_bytes: int
    """Bytes this module's forward keeps for backward, per micro-batch."""


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    name: str
    path: str
    num_params: int
    num_trainable_params: int
    num_units: int
    unit_names: list[str]
    checkpointing: str
    top_activation_modules: list[ModuleActivation]
    trace_seconds: float
    num_traced_ops: int
    repeated_layers: int = 0
    """0: every layer was traced; else the model's stack of that many alike layers was traced
    at three and four layers and built to full depth (checked against the four-layer trace)."""
    seq_len: int | None = None
    """Tokens per sample of the planned batch (its token tensor's second dimension, see
    training/batch_tokens.py); None: the batch holds no token tensor (images, features)."""
    tokens_per_micro_batch: int | None = None
    """micro-batch x seq_len at the plan's micro-batch; None without a token tensor."""

    @classmethod
    def from_json(cls, data: dict) -> ModelSummary:
        """Back from JSON; keys this version does not know (a newer dpplan's) are left out."""
        modules = [ModuleActivation(**m) for m in data.get("top_activation_modules") or ()]
        return cls(**{**known_fields(cls, data), "top_activation_modules": modules})


@dataclass(frozen=True, kw_only=True)
class StageEstimate:
    """One pipeline rank of a plan with pipeline parallelism (every rank of that pipeline
    position holds the same): what it owns and its peak."""

    pp_rank: int
    stages: list[int]
    """Stage indices this rank holds (two with the interleaved and V schedules)."""
    owns: list[str]
    """What those stages hold, in order: ``embedding``, ``layers 0-7``, ``head``, ..."""
    num_params: int
    """Parameters this rank holds (of one tensor-parallel shard with --tp)."""
    in_flight: int
    """Most micro-batches whose activations this rank holds at once (the schedule's)."""
    peak_bytes: int
    """The rank's peak, as ``StrategyEstimate.peak_bytes``."""
    breakdown: dict[str, int]
    peak_phase: str
    fits: bool
    max_batch_size: int

    @classmethod
    def from_json(cls, data: dict) -> StageEstimate:
        return cls(**known_fields(cls, data))


@dataclass(frozen=True, kw_only=True)
class StrategyEstimate:
    """One strategy at one GPU count: the memory of its most loaded rank."""

    strategy: str
    gpus: int
    nodes: int
    batch_size: int
    grad_accum: int
    precision: str
    optimizer: str
    activation_checkpointing: bool
    offload: str
    device: str
    gpu: str | None
    breakdown: dict[str, int]
    """Bytes at the peak by kind: params, grads, optimizer, activations, other."""
    peak_bytes: int
    """The largest per-rank peak: device memory on cuda (what NVML shows), tensor bytes on cpu."""
    peak_allocated_bytes: int
    """Comparable to torch.cuda.max_memory_allocated (cpu: live tensor bytes)."""
    peak_reserved_bytes: int
    """Comparable to torch.cuda.max_memory_reserved (cpu: same as allocated)."""
    peak_rank: int
    peak_phase: str
    capacity_bytes: int
    fits: bool
    """peak_bytes <= capacity_bytes x (1 - headroom_pct / 100) (config.usable_bytes)."""
    max_batch_size: int
    """Largest micro-batch per rank whose peak fits the same usable bytes (0: none)."""
    host_bytes: int | None = None
    """Host RAM per node that offload needs (None without offload)."""
    notes: list[str] = field(default_factory=list)
    dp: int = 1
    """The layout (strategies/mesh.py): data-parallel ranks (replicas x shards) ..."""
    tp: int = 1
    """... tensor-parallel degree ..."""
    pp: int = 1
    """... pipeline stages ..."""
    cp: int = 1
    """... context-parallel degree (dp x tp x pp x cp = gpus) ..."""
    ep: int = 1
    """... and expert-parallel degree (taken from dp x cp, torchtitan's rule)."""
    sp: bool = False
    """Sequence parallelism inside the tensor-parallel groups."""
    headroom_pct: float = 0.0
    """Percent of ``capacity_bytes`` kept free in ``fits`` and ``max_batch_size`` (0 in plans
    saved before the headroom was planned: they were judged against the whole capacity)."""
    pp_schedule: str | None = None
    """With pp > 1: torch's schedule (training/pipeline_layout.py); None without a pipeline."""
    stages: list[StageEstimate] = field(default_factory=list)
    """With pp > 1: every pipeline rank, in pipeline order; ``peak_bytes`` is the largest of
    theirs and ``peak_rank`` names its first global rank. Empty without a pipeline."""

    @property
    def layout(self) -> str:
        """``dp4 x tp2 +sp``: the parallel degrees above 1 (``dp1`` for one rank) whose product
        is the GPUs; expert parallelism, which takes its ranks from dp, after them (``dp8 ep8``)."""
        parts = [f"{name}{getattr(self, name)}" for name in ("dp", "tp", "pp", "cp") if getattr(self, name) > 1]
        return (" x ".join(parts or ["dp1"]) + (f" ep{self.ep}" if self.ep > 1 else "")
                + (" +sp" if self.sp else ""))

    @classmethod
    def from_json(cls, data: dict) -> StrategyEstimate:
        """Back from JSON; keys this version does not know (a newer dpplan's) are left out. A
        plan written before layouts were recorded was data-parallel over every GPU."""
        known = known_fields(cls, data)
        known["stages"] = [StageEstimate.from_json(s) for s in known.get("stages") or ()]
        known.setdefault("dp", known["gpus"] // max(1, known.get("tp", 1)))
        return cls(**known)


class ChangeKind(StrEnum):
    """What a change to a plan that does not fit acts on."""

    SMALLER_BATCH = "smaller_batch"
    CHECKPOINTING = "checkpointing"
    MORE_GPUS = "more_gpus"
    SHARDING = "sharding"
    OFFLOAD_OPTIMIZER = "offload_optimizer"
    OFFLOAD_PARAMS = "offload_params"


@dataclass(frozen=True, kw_only=True)
class FitChange:
    """One thing to try when no estimate fits, with the plan's number behind it."""

    kind: ChangeKind
    flags: str
    """The command-line change: ``--batch-size 6``, ``--activation-checkpointing``, ``--gpus 16``,
    ``--strategy fsdp2,zero3``, ``--offload optimizer``, ``--offload optimizer+params --strategy zero3``."""
    strategy: str
    """The estimate it is read off (smaller_batch: the one that fits it; else the closest)."""
    gpus: int
    nbytes: int
    """What it acts on, per GPU at the closest estimate's peak: activations (checkpointing);
    parameters + gradients + optimizer state (more_gpus, sharding); optimizer state
    (offload_optimizer); parameters (offload_params); 0 for smaller_batch."""

    @classmethod
    def from_json(cls, data: dict) -> FitChange:
        known = known_fields(cls, data)
        return cls(**{**known, "kind": ChangeKind(known["kind"])})


@dataclass(frozen=True, kw_only=True)
class PlanRecommendation:
    """What to run, picked from a plan's estimates by planner/recommendation.py's rule; when
    nothing fits, the closest estimate and what to change."""

    fits: bool
    """False: no estimate fits; the fields below describe the closest one."""
    strategy: str
    gpus: int
    nodes: int
    layout: str
    """The estimate's layout (``dp8``, ``dp4 x tp2 +sp``)."""
    batch_size: int
    """The micro-batch planned (the plan's)."""
    max_batch_size: int
    """The largest micro-batch that fits with this strategy on these GPUs (0: none)."""
    offload: str
    """The offload this run plans: the plan's, or none for a strategy without offload."""
    peak_bytes: int
    usable_bytes: int
    """capacity_bytes x (1 - headroom_pct / 100): what the peak must stay within."""
    capacity_bytes: int
    headroom_pct: float
    changes: list[FitChange] = field(default_factory=list)
    """When nothing fits: what to try, roughly cheapest first (planner/recommendation.py)."""

    @classmethod
    def from_json(cls, data: dict) -> PlanRecommendation:
        """Back from JSON; keys this version does not know (a newer dpplan's) are left out."""
        changes = [FitChange.from_json(c) for c in data.get("changes") or ()]
        return cls(**{**known_fields(cls, data), "changes": changes})


@dataclass(frozen=True, kw_only=True)
class Plan:
    config: PlanConfig
    model: ModelSummary
    estimates: list[StrategyEstimate]
    unsupported: dict[str, str] = field(default_factory=dict)
    """Strategies asked for that the real wrapper refuses for this model, with what it says."""
    recommendation: PlanRecommendation | None = None
    """What to run (None: no estimate, or a plan saved before recommendations were recorded)."""

    def to_json(self) -> dict:
        """The plan's keys of plan.json, in their order there."""
        return {
            "config": self.config.to_json(),
            "model": asdict(self.model),
            "estimates": [asdict(e) for e in self.estimates],
            "unsupported": dict(self.unsupported),
            "recommendation": asdict(self.recommendation) if self.recommendation else None,
        }

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        """Back from ``to_json()`` (or from the whole plan.json, whose other keys it leaves)."""
        recommendation = data.get("recommendation")
        return cls(
            config=PlanConfig.from_json(data["config"]),
            model=ModelSummary.from_json(data["model"]),
            estimates=[StrategyEstimate.from_json(e) for e in data["estimates"]],
            unsupported=dict(data.get("unsupported") or {}),
            recommendation=PlanRecommendation.from_json(recommendation) if recommendation else None,
        )


@dataclass(frozen=True, kw_only=True)
class PlanDocument:
    """plan.json: a plan and how it was made (``dpplan estimate --json``); what the plan's
    reports draw, and what ``dpplan report`` reads back (schema above)."""

    plan: Plan
    dpplan_version: str
    created: str | None
    """UTC, ISO 8601, to the second (None: not recorded)."""
    command: str | None
    """The command line that made it (None when called as a library)."""
    cpu_kernels: str | None = None
    """cpu target: the kernels' instruction set and threads the in-op buffers were measured with
    (planner/cpu_kernels.py ``cpu_description``); None on cuda."""

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION, "kind": KIND, "tool": {"name": TOOL_NAME, "version": self.dpplan_version},
            "created": self.created, "command": self.command, **self.plan.to_json(), "cpu_kernels": self.cpu_kernels,
        }

    @classmethod
    def from_json(cls, data: dict) -> PlanDocument:
        """A plan.json read back; ValueError (one line) when a required key is missing or a value is refused."""
        try:
            return cls(
                plan=Plan.from_json(data), dpplan_version=(data.get("tool") or {}).get("version", "unknown"),
                created=data.get("created"), command=data.get("command"), cpu_kernels=data.get("cpu_kernels"),
            )
        except KeyError as exc:
            raise ValueError(f"not a complete plan JSON: no {exc.args[0]!r} key") from None
        except TypeError as exc:  # a record with a key missing or unknown: the dataclass names it
            raise ValueError(f"not a complete plan JSON: {exc}") from None
