"""Estimate vs measurement: real short CPU training runs (gloo) against `dpplan estimate --device cpu`.

Each case runs 3 optimizer steps on 1, 2 or 4 CPU processes launched through torchrun,
measures every rank's exact peak of live tensor bytes from the second step on (the profiler's
memory events, started before the model is built), and compares the largest per-rank peak with
the estimate's ``peak_bytes``.

    python benchmarks/accuracy.py                 # the whole suite: dpplan's zoo and the third-party zoo
    python benchmarks/accuracy.py --suite own     # dpplan's own zoo (about 25 minutes on 2 cores)
    python benchmarks/accuracy.py --suite third-party   # 35 transformers architectures (needs transformers)
    python benchmarks/accuracy.py --suite deepspeed     # zero1/2/3 through DeepSpeed (needs deepspeed)
    python benchmarks/accuracy.py --suite tensor-parallel   # --tp / --sp (DTensor) with single and fsdp2
    python benchmarks/accuracy.py --suite expert-parallel   # --ep with fsdp2 on Hugging Face MoE decoders
    python benchmarks/accuracy.py --suite pipeline  # --pp: every schedule, alone, with --tp and ddp; every rank
    python benchmarks/accuracy.py --quick         # a few cases
    python benchmarks/accuracy.py --filter fsdp2  # cases whose label contains "fsdp2"
    python benchmarks/accuracy.py --case benchmarks/models/gpt.py fsdp2 2 --precision bf16-mixed
    python benchmarks/accuracy.py --json results.json --markdown table.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpplan.config import PlanConfig, RunConfig, RunSpec  # noqa: E402
from dpplan.planner.deepspeed_config import merge_with_flags, read_deepspeed_config  # noqa: E402
from dpplan.planner.estimate import estimate  # noqa: E402
from dpplan.planner.strategies.registry import DEEPSPEED_STAGES  # noqa: E402
from dpplan.planner.strategies.zero_settings import DEFAULT_ZERO  # noqa: E402
from dpplan.profiler.cpu_run import RunFailed, run_cpu  # noqa: E402

MODELS = ROOT / "benchmarks" / "models"
DEEPSPEED_CONFIGS = ROOT / "benchmarks" / "deepspeed_configs"
THIRD_PARTY = MODELS / "hf"


@dataclass(frozen=True, kw_only=True)
class Case:
    model: str
    strategy: str
    ranks: int
    batch_size: int = 2
    precision: str = "fp32"
    optimizer: str = "adamw"
    activation_checkpointing: bool = False
    grad_accum: int = 1
    nodes: int = 1
    wrap: str | None = None
    offload: str = "none"
    deepspeed_config: str | None = None
    """A DeepSpeed config file (benchmarks/deepspeed_configs/): strategy and precision as it says."""
    tp: int = 1
    sequence_parallel: bool = False
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    seq_len: int | None = None
    """Tokens per sample (``--seq-len``); None: the model file's own."""

    @property
    def label(self) -> str:
        path, _, factory = self.model.partition(".py:")
        name = Path(path).stem + (f":{factory}" if factory else "")
        if Path(self.model).resolve().parent == THIRD_PARTY:
            name = f"hf/{name}"
        parts = [name, self.strategy, f"{self.ranks}r", f"b{self.batch_size}", self.precision, self.optimizer]
        if self.seq_len is not None:
            parts.append(f"s{self.seq_len}")
        if self.activation_checkpointing:
            parts.append("ac")
        if self.grad_accum > 1:
            parts.append(f"ga{self.grad_accum}")
        if self.nodes > 1:
            parts.append(f"{self.nodes}nodes")
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + ("+sp" if self.sequence_parallel else ""))
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.pp > 1:
            parts.append(f"pp{self.pp} {self.pp_schedule}")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        if self.deepspeed_config:
            parts.append(Path(self.deepspeed_config).name)
        return " ".join(parts)

    def settings(self) -> dict:
        """strategy, precision, batch_size, grad_accum, optimizer, offload and zero, as
        ``--deepspeed-config`` would make them from this case's flags."""
        flags = {"strategies": (self.strategy,), "precision": self.precision, "batch_size": self.batch_size,
                 "grad_accum": self.grad_accum, "optimizer": self.optimizer, "offload": self.offload}
        if self.deepspeed_config is None:
            return {**flags, "zero": DEFAULT_ZERO}
        return merge_with_flags(read_deepspeed_config(self.deepspeed_config), flags, set(), (self.ranks,))


@dataclass(kw_only=True)
class Result:
    case: Case
    estimate_bytes: int | None = None
    estimate_per_rank: list[int] = field(default_factory=list)
    """With pipeline parallelism: the plan of each real rank's pipeline rank (``stages[]``),
    in rank order; empty: every rank is planned at ``estimate_bytes``."""
    measured_bytes: int | None = None
    measured_per_rank: list[int] = field(default_factory=list)
    estimate_seconds: float = 0.0
    run_seconds: float = 0.0
    error: str | None = None
    refused: str | None = None
    """Both the planner and the real wrapper refused the model, for this reason (an answer)."""

    @property
    def error_pct(self) -> float | None:
        if self.estimate_bytes is None or not self.measured_bytes:
            return None
        return 100.0 * (self.estimate_bytes - self.measured_bytes) / self.measured_bytes

    @property
    def rank_errors_pct(self) -> list[float]:
        """The estimate against every rank's own peak (ranks of a plan need not be alike); a
        pipeline's ranks each against their own pipeline rank's plan."""
        if self.estimate_bytes is None:
            return []
        planned = self.estimate_per_rank or [self.estimate_bytes] * len(self.measured_per_rank)
        return [100.0 * (e - m) / m for e, m in zip(planned, self.measured_per_rank) if m]


def _m(name: str) -> str:
    return str(MODELS / name)


def suite() -> list[Case]:
    """The benchmark cases: architectures x strategies x precisions x options."""
    cases: list[Case] = []
    strategies = ("single", "ddp", "ddp-zero1", "fsdp-full", "fsdp-grad-op", "fsdp-no-shard", "fsdp2")
    for model in ("gpt.py", "llama.py"):
        for strategy in strategies:
            ranks = 1 if strategy == "single" else 2
            cases.append(Case(model=_m(model), strategy=strategy, ranks=ranks))
            cases.append(Case(model=_m(model), strategy=strategy, ranks=ranks, precision="bf16-mixed"))
    for model in ("bert.py", "resnet.py", "t5.py", "moe.py", "custom.py", "vit.py"):
        for strategy in ("single", "ddp", "fsdp-full", "fsdp2"):
            ranks = 1 if strategy == "single" else 2
            cases.append(Case(model=_m(model), strategy=strategy, ranks=ranks))
        # Models that keep part of their compute in fp32 cannot run under fully_shard's bf16
        # param_dtype (a real-run error too, not a planner one): ResNet's BatchNorm running
        # statistics, the custom model's fp32 LSTM. Their mixed-precision case runs DDP's autocast.
        mixed_strategy = "ddp" if model in ("resnet.py", "custom.py") else "fsdp2"
        cases.append(Case(model=_m(model), strategy=mixed_strategy, ranks=2, precision="bf16-mixed"))
    extra = [
        Case(model=_m("gpt.py"), strategy="fsdp2", ranks=4),
        Case(model=_m("gpt.py"), strategy="fsdp-full", ranks=4, precision="bf16-mixed"),
        Case(model=_m("gpt.py"), strategy="ddp-zero1", ranks=4, optimizer="sgd-momentum"),
        Case(model=_m("llama.py"), strategy="ddp", ranks=2, optimizer="sgd"),
        Case(model=_m("llama.py"), strategy="fsdp2", ranks=2, activation_checkpointing=True),
        Case(model=_m("llama.py"), strategy="fsdp-full", ranks=2, activation_checkpointing=True, precision="bf16-mixed"),
        Case(model=_m("gpt.py"), strategy="ddp", ranks=2, grad_accum=2),
        Case(model=_m("gpt.py"), strategy="fsdp2", ranks=2, grad_accum=2, precision="bf16-mixed"),
        Case(model=_m("gpt.py"), strategy="single", ranks=1, precision="bf16"),
        Case(model=_m("llama.py"), strategy="fsdp2", ranks=2, precision="bf16"),
        Case(model=_m("gpt.py"), strategy="single", ranks=1, activation_checkpointing=True, precision="bf16-mixed"),
        Case(model=_m("gpt.py"), strategy="fsdp-hybrid", ranks=4, nodes=2),
        # Ten alike layers: planned from 3- and 4-layer traces (planner/trace/repeated_layers.py).
        Case(model=_m("gpt_deep.py"), strategy="ddp", ranks=2, precision="bf16-mixed"),
        Case(model=_m("gpt_deep.py"), strategy="fsdp2", ranks=2),
        Case(model=_m("gpt_deep.py"), strategy="fsdp-full", ranks=2, activation_checkpointing=True),
    ]
    return cases + extra


THIRD_PARTY_SETTINGS = (
    # strategy, ranks, precision: one case each for every third-party architecture
    ("single", 1, "fp32"),
    ("ddp", 2, "bf16-mixed"),
    ("fsdp2", 2, "fp32"),
    ("fsdp-full", 2, "bf16-mixed"),
)


def third_party_suite() -> list[Case]:
    """The transformers zoo (benchmarks/models/hf/zoo.py): every architecture under the four
    settings, plus a few options on a decoder, a MoE, an encoder-decoder and a CNN."""
    names = sorted(p.stem for p in THIRD_PARTY.glob("*.py") if p.stem != "zoo")
    cases = [
        Case(model=str(THIRD_PARTY / f"{name}.py"), strategy=strategy, ranks=ranks, precision=precision)
        for name in names for strategy, ranks, precision in THIRD_PARTY_SETTINGS
    ]
    hf = lambda name: str(THIRD_PARTY / f"{name}.py")  # noqa: E731
    cases += [
        Case(model=hf("llama"), strategy="ddp-zero1", ranks=2, precision="bf16-mixed"),
        Case(model=hf("llama"), strategy="fsdp2", ranks=2, precision="bf16-mixed", activation_checkpointing=True),
        Case(model=hf("qwen3_moe"), strategy="fsdp-grad-op", ranks=2, grad_accum=2),
        Case(model=hf("t5"), strategy="ddp", ranks=2, activation_checkpointing=True),
        Case(model=hf("resnet"), strategy="fsdp-grad-op", ranks=2, precision="bf16-mixed"),  # BatchNorm buffers cast too
        Case(model=hf("gpt2"), strategy="fsdp2", ranks=4, precision="bf16-mixed"),
    ]
    return cases


def deepspeed_suite() -> list[Case]:
    """DeepSpeed's stages through deepspeed.initialize (needs DeepSpeed): every stage under fp32
    and the "bf16" section (bf16-mixed) on a GPT, a Llama with grouped-query attention, a ViT and
    Hugging Face's GPT-2 (tied embedding and head), plus bf16 models, checkpointing, gradient
    accumulation and 4 ranks."""
    models = (_m("gpt.py"), _m("llama.py"), _m("vit.py"), str(THIRD_PARTY / "gpt2.py"))
    cases = [
        Case(model=model, strategy=stage, ranks=2, precision=precision)
        for model in models for stage in ("zero1", "zero2", "zero3") for precision in ("fp32", "bf16-mixed")
    ]
    for stage in ("zero1", "zero2", "zero3"):
        cases += [
            Case(model=_m("gpt.py"), strategy=stage, ranks=2, precision="bf16"),
            Case(model=_m("llama.py"), strategy=stage, ranks=2, precision="bf16-mixed", activation_checkpointing=True),
            Case(model=_m("gpt.py"), strategy=stage, ranks=4, precision="bf16-mixed"),
            Case(model=str(THIRD_PARTY / "gpt2.py"), strategy=stage, ranks=2, precision="bf16-mixed", grad_accum=2),
        ]
    # offload_optimizer / offload_param: on a CPU run the host copies are in the peak
    for model in (_m("gpt.py"), _m("llama.py"), str(THIRD_PARTY / "gpt2.py")):
        cases += [Case(model=model, strategy=stage, ranks=2, precision="bf16-mixed", offload="optimizer")
                  for stage in ("zero1", "zero2", "zero3")]
    cases += [
        Case(model=_m("gpt.py"), strategy="zero3", ranks=2, offload="optimizer+params"),
        Case(model=str(THIRD_PARTY / "gpt2.py"), strategy="zero3", ranks=2, precision="bf16-mixed",
             offload="optimizer+params"),
        Case(model=_m("gpt.py"), strategy="zero1", ranks=2, offload="optimizer", grad_accum=2),
        Case(model=_m("gpt.py"), strategy="zero2", ranks=2, precision="bf16-mixed", offload="optimizer", grad_accum=2),
    ]
    # DeepSpeed's "fp16" section (dynamic loss scaling)
    cases += [Case(model=model, strategy=stage, ranks=2, precision="fp16-mixed")
              for model in (_m("gpt.py"), _m("vit.py")) for stage in ("zero1", "zero2", "zero3")]
    # users' config files (benchmarks/deepspeed_configs, through --deepspeed-config's reader)
    def config(name: str) -> str:
        return str(DEEPSPEED_CONFIGS / name)

    for model in (str(THIRD_PARTY / "gpt2.py"), str(THIRD_PARTY / "llama.py")):  # "auto" needs config.hidden_size
        cases += [
            Case(model=model, strategy="zero2", ranks=2, precision="bf16-mixed", deepspeed_config=config("hf_zero2_auto.json")),
            Case(model=model, strategy="zero3", ranks=2, precision="bf16-mixed", deepspeed_config=config("hf_zero3_auto.json")),
            Case(model=model, strategy="zero3", ranks=2, precision="bf16-mixed",
                 deepspeed_config=config("hf_zero3_offload_auto.json")),
        ]
    cases.append(Case(model=str(THIRD_PARTY / "gpt2.py"), strategy="zero2", ranks=2, precision="bf16-mixed",
                      deepspeed_config=config("hf_zero2_offload_auto.json")))
    for model in (_m("gpt.py"), _m("vit.py"), str(THIRD_PARTY / "gpt2.py")):
        cases += [
            Case(model=model, strategy=stage, ranks=2, precision="bf16-mixed",
                 deepspeed_config=config(f"torch_autocast_{stage}.json"))
            for stage in ("zero1", "zero2", "zero3")
        ]
    for model in (_m("gpt.py"), _m("llama.py")):
        cases.append(Case(model=model, strategy="zero1", ranks=2, precision="bf16-mixed",
                          deepspeed_config=config("zero1_small_buckets.json")))
    for model in (_m("llama.py"), _m("vit.py")):
        cases.append(Case(model=model, strategy="zero3", ranks=2, precision="bf16-mixed",
                          deepspeed_config=config("zero3_small_groups.json")))
    return cases


def tensor_parallel_suite() -> list[Case]:
    """Tensor and sequence parallelism (--tp, --sp): tp 2 and 4 alone, with and without sequence
    parallelism; FSDP2 over dp 2 x tp 2 on 4 ranks; bf16-mixed, checkpointing and
    gradient accumulation; Hugging Face decoder families (Llama, Qwen2, Qwen3, Gemma 2, Mistral,
    each with its own base_model_tp_plan) and mixture-of-experts decoders (Mixtral, Qwen3-MoE:
    attention split, experts whole, as their plans say)."""
    gpt = str(ROOT / "dpplan" / "models" / "default_gpt.py")  # the bundled GPT, 8 heads
    llama = _m("llama.py")  # 2 KV heads: tp 2 at most
    cases = []
    for sp in (False, True):
        cases += [
            Case(model=llama, strategy="single", ranks=2, tp=2, sequence_parallel=sp),
            Case(model=gpt, strategy="single", ranks=2, tp=2, sequence_parallel=sp),
            Case(model=gpt, strategy="single", ranks=4, tp=4, sequence_parallel=sp),
            Case(model=llama, strategy="fsdp2", ranks=4, tp=2, sequence_parallel=sp),
            Case(model=llama, strategy="fsdp2", ranks=4, tp=2, sequence_parallel=sp, precision="bf16-mixed"),
            Case(model=str(THIRD_PARTY / "llama.py"), strategy="single", ranks=2, tp=2, sequence_parallel=sp),
            Case(model=str(THIRD_PARTY / "qwen2.py"), strategy="fsdp2", ranks=4, tp=2, sequence_parallel=sp),
            Case(model=str(THIRD_PARTY / "mixtral.py"), strategy="single", ranks=2, tp=2, sequence_parallel=sp),
        ]
    cases += [
        Case(model=llama, strategy="single", ranks=2, tp=2, precision="bf16-mixed"),
        Case(model=llama, strategy="fsdp2", ranks=4, tp=2, grad_accum=2),
        Case(model=llama, strategy="fsdp2", ranks=4, tp=2, grad_accum=2, precision="bf16-mixed"),
        Case(model=llama, strategy="fsdp2", ranks=4, tp=2, sequence_parallel=True, activation_checkpointing=True),
        Case(model=gpt, strategy="fsdp2", ranks=4, tp=2, sequence_parallel=True, precision="bf16-mixed"),
        Case(model=str(THIRD_PARTY / "qwen3.py"), strategy="fsdp2", ranks=4, tp=2, sequence_parallel=True),
        Case(model=str(THIRD_PARTY / "qwen3_moe.py"), strategy="single", ranks=2, tp=2),
        Case(model=str(THIRD_PARTY / "gemma2.py"), strategy="single", ranks=2, tp=2, sequence_parallel=True),
        Case(model=str(THIRD_PARTY / "mistral.py"), strategy="fsdp2", ranks=4, tp=2, precision="bf16-mixed"),
    ]
    return cases


BALANCED_ROUTER = MODELS / "moe_balanced_router.py"


def expert_parallel_suite() -> list[Case]:
    """Expert parallelism (--ep) beside FSDP2 on Hugging Face MoE decoders (Mixtral, OLMoE,
    Qwen3-MoE; 4 experts, top-2): the experts split over 2 and 4 ranks, each experts module an
    FSDP2 unit over the ranks that hold the same experts (1 or 2 of them); fp32 and bf16-mixed,
    checkpointing and gradient accumulation; a two-expert Mixtral whose one expert per rank is
    split on dim 1 over the ranks holding it. Every case runs twice: with a router balanced by
    construction (benchmarks/models/moe_balanced_router.py: the planner's own error), and with
    the model's own router at random init (that plus the router's imbalance, which no plan can
    know: the plan assumes a balanced router)."""
    settings = [
        dict(ranks=2, ep=2), dict(ranks=2, ep=2, precision="bf16-mixed"),
        dict(ranks=4, ep=2), dict(ranks=4, ep=4, precision="bf16-mixed"),
    ]
    extra = [
        ("mixtral", dict(ranks=4, ep=2, precision="bf16-mixed")),
        ("mixtral", dict(ranks=2, ep=2, grad_accum=2)),
        ("mixtral", dict(ranks=4, ep=2, grad_accum=2, precision="bf16-mixed")),
        ("mixtral", dict(ranks=2, ep=2, activation_checkpointing=True)),
        ("qwen3_moe", dict(ranks=4, ep=4, activation_checkpointing=True)),
    ]
    chosen = [(name, s) for name in ("mixtral", "olmoe", "qwen3_moe") for s in settings] + extra
    cases = []
    for balanced in (True, False):
        for name, options in chosen:
            model = f"{BALANCED_ROUTER}:{name}" if balanced else str(THIRD_PARTY / f"{name}.py")
            cases.append(Case(model=model, strategy="fsdp2", **options))  # type: ignore[arg-type]
    # one expert per rank, split on dim 1 over the 2 ranks holding it (expert_shard_dim)
    two_experts = f"{BALANCED_ROUTER}:mixtral_2_experts"
    cases += [
        Case(model=two_experts, strategy="fsdp2", ranks=4, ep=2),
        Case(model=two_experts, strategy="fsdp2", ranks=4, ep=2, precision="bf16-mixed"),
        Case(model=two_experts, strategy="fsdp2", ranks=4, ep=2, precision="bf16-mixed", grad_accum=2),
        Case(model=two_experts, strategy="fsdp2", ranks=4, ep=2, activation_checkpointing=True),
    ]
    return cases


DEFAULT_GPT = str(ROOT / "dpplan" / "models" / "default_gpt.py")
"""The bundled GPT (6 layers, 8 heads), with its own pipeline_stage and pipeline_loss hooks."""
PIPELINE_DECODERS = MODELS / "pipeline_decoders.py"
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
"""The schedules of the full grid; the zero-bubble ones (input and weight gradients in separate
steps) on a few cases."""
PIPELINE_SEQ_LEN = 64
"""The bundled GPT's tokens per sample here (its own 256 would make each case several times slower)."""


def pipeline_case(model: str, pp: int, schedule: str, mode: str, **options) -> Case:
    """``pp`` pipeline ranks running ``schedule`` with 2 micro-batches per pipeline rank (so
    1F1B has a steady state), ``mode``: "alone" (single on pp ranks), "tp2" (single on tp x pp
    ranks), "ddp2" (DDP over 2 pipelines) or "fsdp2" (FSDP2 over 2 pipelines)."""
    tp, dp = {"alone": (1, 1), "tp2": (2, 1), "ddp2": (1, 2), "fsdp2": (1, 2)}[mode]
    strategy = "fsdp2" if mode == "fsdp2" else "ddp" if dp > 1 else "single"
    seq_len = PIPELINE_SEQ_LEN if model == DEFAULT_GPT else None
    return Case(model=model, strategy=strategy, ranks=pp * tp * dp, tp=tp, pp=pp, pp_schedule=schedule,
                grad_accum=2 * pp, seq_len=seq_len, **options)


def pipeline_suite() -> list[Case]:
    """Pipeline parallelism (--pp), every pipeline rank against its own plan: pp 2 and 4 under
    GPipe, 1F1B and interleaved 1F1B, alone, with tp 2 and with DDP over 2 pipelines (pp 4
    alone only: 4 ranks at most on this machine), fp32 and bf16-mixed, on the bundled GPT (its
    own pipeline_stage hook) and Hugging Face Llama and Qwen2 cut by dpplan; the zero-bubble
    schedules (interleaved zero bubble, ZBV) on a few of them, alone or with tp (DDP and FSDP2
    are refused under them); FSDP2 over 2 pipelines; checkpointing under each."""
    llama, qwen2 = f"{PIPELINE_DECODERS}:llama", f"{PIPELINE_DECODERS}:qwen2"
    grid = [(pp, schedule, mode) for pp in (2, 4) for schedule in PIPELINE_SCHEDULES
            for mode in (("alone", "tp2", "ddp2") if pp == 2 else ("alone",))]
    # the GPT's 6 layers cannot make interleaved 1F1B's 8 stages over 4 ranks: the decoders (8 layers) do
    cases = [pipeline_case(DEFAULT_GPT, pp, schedule, mode, precision=precision)
             for pp, schedule, mode in grid for precision in ("fp32", "bf16-mixed")
             if not (pp == 4 and schedule == "interleaved-1f1b")]
    # the Hugging Face decoders: the same grid, each setting at one precision (they alternate)
    for index, (pp, schedule, mode) in enumerate(grid):
        first, second = ("fp32", "bf16-mixed") if index % 2 == 0 else ("bf16-mixed", "fp32")
        cases += [pipeline_case(llama, pp, schedule, mode, precision=first),
                  pipeline_case(qwen2, pp, schedule, mode, precision=second)]
    cases += [
        pipeline_case(DEFAULT_GPT, 2, "zero-bubble", "alone"),
        pipeline_case(DEFAULT_GPT, 2, "zero-bubble", "tp2", precision="bf16-mixed"),
        pipeline_case(llama, 2, "zero-bubble", "tp2"),
        pipeline_case(llama, 4, "zero-bubble", "alone", precision="bf16-mixed"),
        pipeline_case(DEFAULT_GPT, 2, "zbv", "alone"),
        pipeline_case(DEFAULT_GPT, 2, "zbv", "tp2", precision="bf16-mixed"),
        pipeline_case(qwen2, 2, "zbv", "alone"),
        pipeline_case(qwen2, 4, "zbv", "alone", precision="bf16-mixed"),
    ]
    # FSDP2 over 2 pipelines (strategies/fsdp2_pipeline.py): both precisions, both one-stage schedules
    cases += [
        pipeline_case(DEFAULT_GPT, 2, "1f1b", "fsdp2", precision="bf16-mixed"),
        pipeline_case(DEFAULT_GPT, 2, "gpipe", "fsdp2"),
        pipeline_case(llama, 2, "1f1b", "fsdp2", activation_checkpointing=True, precision="bf16-mixed"),
        pipeline_case(qwen2, 2, "gpipe", "fsdp2"),
    ]
    # activation checkpointing, one case per schedule family: one stage per rank, looped, zero
    # bubble (not the GPT under 1F1B: at 64 tokens its peak is the optimizer step's, checkpointed or not)
    cases += [
        pipeline_case(llama, 2, "1f1b", "tp2", activation_checkpointing=True),
        pipeline_case(llama, 2, "gpipe", "ddp2", activation_checkpointing=True, precision="bf16-mixed"),
        pipeline_case(DEFAULT_GPT, 2, "interleaved-1f1b", "tp2", activation_checkpointing=True),
        pipeline_case(qwen2, 4, "interleaved-1f1b", "alone", activation_checkpointing=True),
        pipeline_case(DEFAULT_GPT, 2, "zero-bubble", "alone", activation_checkpointing=True),
        pipeline_case(llama, 2, "zbv", "alone", activation_checkpointing=True, precision="bf16-mixed"),
    ]
    return cases


def quick_suite() -> list[Case]:
    return [
        Case(model=_m("gpt.py"), strategy="single", ranks=1),
        Case(model=_m("gpt.py"), strategy="ddp", ranks=2, precision="bf16-mixed"),
        Case(model=_m("llama.py"), strategy="fsdp2", ranks=2, precision="bf16-mixed"),
        Case(model=_m("gpt.py"), strategy="fsdp-full", ranks=2),
        Case(model=_m("gpt.py"), strategy="ddp-zero1", ranks=2),
        Case(model=_m("gpt.py"), strategy="zero2", ranks=2, precision="bf16-mixed"),
    ]


def case_run(case: Case) -> tuple[RunSpec, str]:
    """The case's training step and its strategy (a --deepspeed-config file may set both)."""
    settings = case.settings()
    strategy = settings.pop("strategies")[0]
    run = RunSpec(model=case.model, activation_checkpointing=case.activation_checkpointing, wrap=case.wrap,
                  tp=case.tp, sequence_parallel=case.sequence_parallel, ep=case.ep, pp=case.pp,
                  pp_schedule=case.pp_schedule, seq_len=case.seq_len, **settings)
    return run, strategy


def pipeline_rank_of(rank: int, num_ranks: int, pp: int) -> int:
    """The pipeline rank of global rank ``rank``: pp is the outermost mesh axis
    (profiler/pipeline_run.py), so each pipeline rank is ``num_ranks // pp`` neighbouring ranks."""
    return rank // (num_ranks // pp)


def estimate_case(case: Case) -> tuple[int, list[int]]:
    """The plan's peak (its heaviest rank's) and, with pipeline parallelism, the plan of every
    real rank's pipeline rank (``stages[]``), in rank order."""
    run, strategy = case_run(case)
    config = PlanConfig(run=run, strategies=(strategy,), gpus=(case.ranks,), nodes=case.nodes, device="cpu")
    planned = estimate(config).estimates[0]
    if case.pp == 1:
        return planned.peak_bytes, []
    by_pp_rank = {stage.pp_rank: stage.peak_bytes for stage in planned.stages}
    return planned.peak_bytes, [by_pp_rank[pipeline_rank_of(r, case.ranks, case.pp)] for r in range(case.ranks)]


def measure_case(case: Case) -> list[int]:
    run, strategy = case_run(case)
    config = RunConfig(run=run, strategy=strategy, nodes=case.nodes, steps=3)
    return [r["steady_peak_bytes"] for r in run_cpu(config, case.ranks)]


def run_case(case: Case) -> Result:
    result = Result(case=case)
    refusal = None
    try:
        start = time.perf_counter()
        result.estimate_bytes, result.estimate_per_rank = estimate_case(case)
        result.estimate_seconds = time.perf_counter() - start
    except ValueError as exc:
        if not any(marker in str(exc) for marker in REFUSALS):
            result.error = f"estimate: {type(exc).__name__}: {exc}"
            return result
        refusal = str(exc)  # the plan says the wrapper refuses: the real run must say so too
    except Exception as exc:  # reported in the table, the suite goes on
        result.error = f"estimate: {type(exc).__name__}: {exc}"
        return result
    try:
        start = time.perf_counter()
        result.measured_per_rank = measure_case(case)
        result.measured_bytes = max(result.measured_per_rank)
        result.run_seconds = time.perf_counter() - start
        if refusal is not None:
            result.error = f"estimate refused ({refusal}) but the real run trained"
    except (RunFailed, Exception) as exc:
        first_line = str(exc).splitlines()[0]
        if refusal is not None and any(marker in str(exc) for marker in REFUSALS):
            result.refused = refusal
        else:
            result.error = f"run: {type(exc).__name__}: {first_line}"
    return result


REFUSALS = ("doesn't support scalar parameters",)
"""What a wrapper says when it refuses a model (and the planner with it)."""


def summarize(results: list[Result]) -> dict:
    errors = [abs(r.error_pct) for r in results if r.error_pct is not None]
    rank_errors = [abs(e) for r in results for e in r.rank_errors_pct]
    return {
        "cases": len(results),
        "answered": len(errors) + sum(r.refused is not None for r in results),
        "refused_as_the_wrapper": sum(r.refused is not None for r in results),
        "median_abs_error_pct": statistics.median(errors) if errors else None,
        "max_abs_error_pct": max(errors) if errors else None,
        "within_2pct": sum(e <= 2.0 for e in errors),
        "median_abs_rank_error_pct": statistics.median(rank_errors) if rank_errors else None,
        "max_abs_rank_error_pct": max(rank_errors) if rank_errors else None,
    }


SUITES = {
    "own": "dpplan's model zoo (benchmarks/models)",
    "third-party": "third-party architectures (transformers, benchmarks/models/hf)",
    "deepspeed": "DeepSpeed's ZeRO stages (deepspeed.initialize, both zoos)",
    "tensor-parallel": "tensor and sequence parallelism (DTensor, --tp / --sp)",
    "expert-parallel": "expert parallelism beside FSDP2 (--ep), routers balanced by construction",
    "expert-parallel-routed": "expert parallelism beside FSDP2 (--ep), the models' own routers at random init",
    "pipeline": "pipeline parallelism (--pp), every pipeline rank against its own plan",
}


def suite_of(case: Case) -> str:
    if case.pp > 1:
        return "pipeline"
    if case.ep > 1:
        return "expert-parallel" if case.model.startswith(str(BALANCED_ROUTER)) else "expert-parallel-routed"
    if case.tp > 1:
        return "tensor-parallel"
    if case.strategy in DEEPSPEED_STAGES:
        return "deepspeed"
    return "third-party" if Path(case.model).resolve().parent == THIRD_PARTY else "own"


def _summary_line(summary: dict) -> str:
    if not summary["answered"]:
        return "No case answered."
    refused = summary.get("refused_as_the_wrapper", 0)
    line = f"Answered {summary['answered']} of {summary['cases']}"
    if refused:
        line += f" ({refused} refused by the planner exactly as the real wrapper refuses them)"
    if summary["median_abs_error_pct"] is not None:
        line += (f"; within 2%: {summary['within_2pct']}, median |error|: {summary['median_abs_error_pct']:.3f}%, "
                 f"max |error|: {summary['max_abs_error_pct']:.3f}%")
    if summary.get("max_abs_rank_error_pct") is not None:
        line += (f"; every rank against its own peak: median |error| {summary['median_abs_rank_error_pct']:.3f}%, "
                 f"max {summary['max_abs_rank_error_pct']:.3f}%")
    return line + "."


def _package_versions() -> str:
    """transformers' and DeepSpeed's versions where installed (their zoos and stages need them)."""
    import importlib.metadata

    versions = ""
    for package in ("transformers", "deepspeed"):
        try:
            versions += f", {package} {importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def markdown(results: list[Result], command: str) -> str:
    import platform

    import torch

    from dpplan.planner.cpu_kernels import cpu_description

    lines = [
        "# Accuracy: `dpplan estimate --device cpu` against real CPU training runs",
        "",
        "Each case builds the model, wraps it as the strategy does (torchrun, gloo), trains 1 warm-up",
        "step and 3 timed steps and records every CPU tensor allocation exactly (profiler/cpu_memory.py,",
        "started before the process group and the model exist). *Measured* is the steady-state peak (the",
        "timed steps, after the optimizer state exists) of",
        "the most loaded rank; *estimate* is `peak_bytes` of `dpplan estimate --device cpu` for the",
        "same settings. Micro-batch 2 unless the case says otherwise.",
        "",
        f"Generated by `{command}` with torch {torch.__version__}{_package_versions()}, Python {platform.python_version()},",
        f"{os.cpu_count()} CPU cores, CPU kernels: {cpu_description()}.",
        "",
        f"**All cases: {_summary_line(summarize(results))}**",
    ]
    for suite, title in SUITES.items():
        chosen = [r for r in results if suite_of(r.case) == suite]
        if not chosen:
            continue
        lines += ["", f"## {title}", "", _summary_line(summarize(chosen)), ""]
        if suite == "pipeline":
            lines += [PIPELINE_NOTE, ""] + [f"- {schedule}: {_summary_line(summarize(of))}"
                                            for schedule, of in _by_schedule(chosen).items()] + [""]
        lines += ["| case | estimate (bytes) | measured max rank (bytes) | error | every rank's error |",
                  "|---|---:|---:|---:|---:|"]
        for r in chosen:
            if r.error_pct is not None:
                err = f"{r.error_pct:+.3f}%"
            elif r.refused:
                err = "refused, as the wrapper refuses it"
            else:
                err = r.error or ""
            ranks = r.rank_errors_pct
            spread = f"{min(ranks):+.3f}% .. {max(ranks):+.3f}%" if len(ranks) > 1 else ""
            if r.estimate_per_rank and ranks:  # a pipeline's ranks differ by design: each one, in rank order
                spread = " / ".join(f"{e:+.3f}%" for e in ranks)
            lines.append(f"| {r.case.label} | {r.estimate_bytes or ''} | {r.measured_bytes or ''} | {err} | {spread} |")
    return "\n".join(lines) + "\n"


PIPELINE_NOTE = (
    "Here *estimate* is the plan's heaviest pipeline rank and *every rank's error* lists each real rank, "
    "in rank order, against its own pipeline rank's plan (`estimates[0].stages[g // (ranks / pp)]`: pp is "
    "the outermost mesh axis). `gaM` is the M micro-batches of each step, `sN` the tokens per sample.")


def _by_schedule(results: list[Result]) -> dict[str, list[Result]]:
    """A pipeline suite's results by schedule, in ``--pp-schedule``'s order."""
    from dpplan.training.pipeline_layout import SCHEDULES

    return {s: [r for r in results if r.case.pp_schedule == s] for s in SCHEDULES
            if any(r.case.pp_schedule == s for r in results)}


def _write(results: list[Result], command: str, json_path: Path | None, markdown_path: Path | None) -> None:
    if json_path:
        json_path.write_text(json.dumps(
            {"command": command, "summary": summarize(results),
             "summary_by_suite": {s: summarize([r for r in results if suite_of(r.case) == s]) for s in SUITES},
             "pipeline_summary_by_schedule": {
                 s: summarize(of) for s, of in _by_schedule([r for r in results if r.case.pp > 1]).items()},
             "results": [{**asdict(r.case), "label": r.case.label, "suite": suite_of(r.case),
                          "estimate_bytes": r.estimate_bytes, "estimate_per_rank": r.estimate_per_rank,
                          "measured_bytes": r.measured_bytes,
                          "measured_per_rank": r.measured_per_rank, "error_pct": r.error_pct,
                          "rank_errors_pct": r.rank_errors_pct,
                          "error": r.error, "refused": r.refused} for r in results]},
            indent=1))
    if markdown_path:
        markdown_path.write_text(markdown(results, command))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dpplan estimate vs real CPU runs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--suite", choices=("all", *SUITES), default="all")
    parser.add_argument("--filter", default=None)
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "STRATEGY", "RANKS"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--pp-schedule", default="1f1b")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--json", type=Path, help="written after every case, so an interrupted run keeps its results")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    if args.case:
        cases = [
            Case(
                model=args.case[0], strategy=args.case[1], ranks=int(args.case[2]),
                batch_size=args.batch_size, precision=args.precision, optimizer=args.optimizer,
                activation_checkpointing=args.activation_checkpointing, grad_accum=args.grad_accum,
                nodes=args.nodes, tp=args.tp, sequence_parallel=args.sp, ep=args.ep, pp=args.pp,
                pp_schedule=args.pp_schedule, seq_len=args.seq_len,
            )
        ]
    elif args.quick:
        cases = quick_suite()
    else:
        cases = (suite() if args.suite in ("all", "own") else []) + (
            third_party_suite() if args.suite in ("all", "third-party") else []) + (
            deepspeed_suite() if args.suite in ("all", "deepspeed") else []) + (
            tensor_parallel_suite() if args.suite in ("all", "tensor-parallel") else []) + (
            # (--suite expert-parallel runs both halves: balanced routers and the models' own)
            [c for c in expert_parallel_suite() if args.suite == "all" or suite_of(c).startswith(args.suite)]) + (
            pipeline_suite() if args.suite in ("all", "pipeline") else [])
    if args.filter:
        cases = [c for c in cases if args.filter in c.label]

    command = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for path in (args.json, args.markdown):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'case':<58} {'estimate':>12} {'measured':>12} {'error':>9}", flush=True)
    for case in cases:
        r = run_case(case)
        results.append(r)
        err = f"{r.error_pct:+.3f}%" if r.error_pct is not None else ("refused" if r.refused else "-")
        print(f"{case.label:<58} {r.estimate_bytes or '-':>12} {r.measured_bytes or '-':>12} {err:>9}"
              + (f"  {r.error}" if r.error else ""), flush=True)
        _write(results, command.strip(), args.json, None)
    print(json.dumps(summarize(results)))
    _write(results, command.strip(), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
