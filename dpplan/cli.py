"""dpplan's command line: a thin layer over planner/, profiler/ and reports/.

Examples:

    dpplan estimate                                   # the bundled model, all strategies, 1/2/4/8 GPUs
    dpplan estimate model.py                          # your model (see README: the model-file contract)
    dpplan estimate Qwen/Qwen2.5-7B                   # a Hugging Face model by name (also config.json, a dir)
    dpplan estimate model.py --strategy fsdp-full,zero2 --gpus 64 --nodes 8 --batch-size 4 \\
        --precision bf16-mixed --activation-checkpointing --gpu a100-80gb
    dpplan estimate model.py --json plan.json         # the same, machine-readable (- for stdout)
    dpplan estimate model.py --device cpu --gpus 2    # what a CPU (gloo) run allocates
    dpplan profile model.py --gpus 4                  # real runs, measured beside the estimates
    dpplan estimate model.py --html plan.html         # an HTML report (also: profile --html)
    dpplan report profile.json -o report.html         # re-render any saved estimate or profile JSON
    dpplan profile model.py --gpus 4 --find-batch-size --gpu-memory 24GiB   # largest batch on a 24 GiB card
"""

from __future__ import annotations

import os
import shlex
import sys

import click

from dpplan import __version__
from dpplan.cli_types import BYTE_SIZE, ENDPOINT, GPU_NAME, POSITIVE_INT_LIST, STRATEGY_LIST
from dpplan.config import (
    DEFAULT_GPU_COUNTS,
    DEFAULT_HEADROOM_PCT,
    DEFAULT_MAX_TRIALS,
    DEFAULT_PROFILE_STRATEGIES,
    DEFAULT_TRIAL_STEPS,
    MIN_SAMPLE_HZ,
    OFFLOADS,
    PLAN_DEVICES,
    PP_SCHEDULES,
    PRECISIONS,
    PROFILE_DEVICES,
    RUN_FIELDS,
    PlanConfig,
    ProfileConfig,
    RunSpec,
)
from dpplan.errors import FAILURE_EXIT, INTERRUPTED_EXIT, DpplanError, Interrupted, RunFailed, UsageError
from dpplan.planner.cpu_isa import ISAS as CPU_ISAS
from dpplan.planner.cpu_isa import apply as apply_cpu_isa
from dpplan.planner.hardware import DEFAULT_GPU
from dpplan.planner.strategies.registry import (
    CONTEXT_PARALLEL_STRATEGIES,
    EXPERT_PARALLEL_STRATEGIES,
    PIPELINE_PARALLEL_STRATEGIES,
    STRATEGIES,
    TENSOR_PARALLEL_STRATEGIES,
)
from dpplan.reports.html_settings import PLOTLYJS_MODES
from dpplan.training.optimizers import OPTIMIZERS
from dpplan.training.pipeline_layout import SPLIT_BACKWARD_SCHEDULES


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _run_safely(action):
    """Turn dpplan's errors into one line and their exit code (dpplan/errors.py); never a
    traceback wall. Anything else is a bug of ours: one line, exit 1, and with DPPLAN_DEBUG=1
    the traceback."""
    try:
        return action()
    except KeyboardInterrupt:
        _fail("interrupted", INTERRUPTED_EXIT)
    except DpplanError as exc:
        _fail(exc.one_line(), exc.exit_code)
    except Exception as exc:
        if os.environ.get("DPPLAN_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (set DPPLAN_DEBUG=1 for the traceback)", FAILURE_EXIT)


PLOTLYJS_OPTION = click.option(
    "--plotlyjs", type=click.Choice(PLOTLYJS_MODES), default="inline", show_default=True,
    help="inline: plotly.js inside the HTML file (opens offline, ~5 MB); cdn: linked from cdn.plot.ly (small).",
)


HEADROOM_OPTION = click.option(
    "--headroom", "headroom_pct", type=click.FloatRange(min=0, max=100, max_open=True), default=DEFAULT_HEADROOM_PCT,
    show_default=True, metavar="PCT",
    help="Memory kept free: a plan fits, and a micro-batch is recommended, only if its peak is <= (100 - PCT)% "
         "of the memory.",
)
"""--headroom, the same for estimate and profile."""


def html_options(command):
    """--html and --plotlyjs, the same for estimate and profile."""
    command = PLOTLYJS_OPTION(command)
    return click.option("--html", "html_path", metavar="PATH", default=None,
                        help="Also write an HTML report (plotly charts), one self-contained file.")(command)


class _RecordingGroup(click.Group):
    """Keeps the arguments it was invoked with, so every output can say the exact command
    (from the shell, sys.argv; in-process callers such as tests pass their own)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["dpplan.argv"] = list(args)
        return super().parse_args(ctx, args)


def _command_line() -> str:
    argv = click.get_current_context().meta.get("dpplan.argv", sys.argv[1:])
    return "dpplan " + " ".join(shlex.quote(a) for a in argv)


RUN_FLAGS = ("strategies", "precision", "offload", "optimizer", "batch_size", "grad_accum")
"""The flags a --deepspeed-config file can also set."""
RUN_DEFAULTS = RunSpec()
"""The flags' defaults are RunSpec's: estimate, profile and every real run share one set."""


def run_spec(model: str | None, flags: dict, deepspeed_config: str | None,
             gpus: tuple[int, ...]) -> tuple[RunSpec, tuple[str, ...]]:
    """The RunSpec and the strategies the run flags ask for. With --deepspeed-config, the file's
    values and the flags' where the file says "auto"; a flag typed on the command line that
    contradicts the file is an error."""
    values = {name: flags[name] for name in (*RUN_FIELDS, "strategies") if name in flags}
    if deepspeed_config is not None:
        from click.core import ParameterSource

        from dpplan.planner.deepspeed_config import merge_with_flags, read_deepspeed_config

        ctx = click.get_current_context()
        given = {name for name in RUN_FLAGS if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
        values.update(merge_with_flags(read_deepspeed_config(deepspeed_config), {k: values[k] for k in RUN_FLAGS},
                                       given, gpus))
    strategies = values.pop("strategies")
    if values.get("pp", 1) > 1 and _tensor_parallel_default("grad_accum", None, True):
        values["grad_accum"] = values["pp"]  # --pp without --grad-accum: one micro-batch per stage rank
    return RunSpec(model=model, **values), strategies


def _tensor_parallel_default(name: str, given, default):
    """``default`` when the flag ``name`` was not typed (its own default does not apply with --tp)."""
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(name)
    return default if source in (ParameterSource.DEFAULT, None) else given


def run_options(command):
    """The flags that describe the training run, shared by estimate and profile so that they
    mean exactly the same in both (every profiled run has a matching estimate)."""
    options = [
        click.option("--batch-size", type=click.IntRange(min=1), default=RUN_DEFAULTS.batch_size, show_default=True,
                     help="Micro-batch per GPU."),
        click.option("--grad-accum", type=click.IntRange(min=1), default=RUN_DEFAULTS.grad_accum, show_default=True,
                     help="Micro-batches per optimizer step."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=RUN_DEFAULTS.precision, show_default=True,
                     help="fp32 | bf16-mixed (fp32 params, bf16 compute) | fp16-mixed (+ grad scaler) | bf16 (all bf16)."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=RUN_DEFAULTS.optimizer, show_default=True),
        click.option("--activation-checkpointing", is_flag=True, default=RUN_DEFAULTS.activation_checkpointing,
                     help="The model's gradient_checkpointing_enable(), else non-reentrant checkpointing per unit."),
        click.option("--offload", type=click.Choice(OFFLOADS), default=RUN_DEFAULTS.offload, show_default=True,
                     help="Move optimizer state (and parameters) to host memory."),
        click.option("--wrap", metavar="CLASSNAME", default=RUN_DEFAULTS.wrap,
                     help="FSDP / checkpointing unit class (default: children of the largest nn.ModuleList)."),
        click.option("--tp", type=click.IntRange(min=1), default=RUN_DEFAULTS.tp, show_default=True,
                     help="Tensor-parallel degree: each layer split over this many GPUs (the model file's "
                          "tp_plan, a Hugging Face model's own plan, or Megatron's rule); --strategy then runs "
                          "over gpus / tp data-parallel ranks."),
        click.option("--sp", "sequence_parallel", is_flag=True, default=RUN_DEFAULTS.sequence_parallel,
                     help="With --tp: sequence parallelism (norms and the residual stream split along the sequence)."),
        click.option("--ep", type=click.IntRange(min=1), default=RUN_DEFAULTS.ep, show_default=True,
                     help="Expert-parallel degree: each MoE layer's experts split over this many of the "
                          "data-parallel ranks (with --strategy fsdp2)."),
        click.option("--pp", type=click.IntRange(min=1), default=RUN_DEFAULTS.pp, show_default=True,
                     help="Pipeline-parallel degree: the layers split in order over this many GPUs (the model "
                          "file's pipeline_stage, or dpplan's cut of a Hugging Face decoder); --grad-accum is "
                          "then the micro-batches per step; --strategy single or ddp over gpus / (tp x pp)."),
        click.option("--pp-schedule", type=click.Choice(PP_SCHEDULES), default=RUN_DEFAULTS.pp_schedule,
                     show_default=True, help="With --pp: torch's pipeline schedule."),
        click.option("--cp", type=click.IntRange(min=1), default=RUN_DEFAULTS.cp, show_default=True,
                     help="Context-parallel degree: each sequence split over this many GPUs, attention by torch's "
                          "ring attention (with --strategy fsdp2, --seq-len divisible by 2 x cp; GPUs only; "
                          "planned by rule, not validated)."),
        click.option("--seq-len", type=click.IntRange(min=1), default=RUN_DEFAULTS.seq_len,
                     help="Tokens per sample, passed to the model file's example_batch(batch_size, seq_len=...) "
                          "[default: the file's own; for a model by name a power of two up to 2048 and its "
                          "position limit]."),
        click.option("--deepspeed-config", "deepspeed_config", metavar="JSON", default=None,
                     help="A DeepSpeed config file: its ZeRO stage, precision, offload, batch, accumulation and "
                          'ZeRO settings are planned ("auto" as HF\'s Trainer fills it, from these flags).'),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(cls=_RecordingGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dpplan")
def main() -> None:
    """Plan and profile the memory of multi-GPU PyTorch training.

    \b
    Examples:
      dpplan estimate                                   # the bundled GPT, every strategy, 1-8 H100s
      dpplan estimate model.py --gpus 64 --gpus-per-node 8 --strategy fsdp2 --tp 8 --sp
      dpplan estimate Qwen/Qwen2.5-7B                   # a Hugging Face model by name: its config.json only
      dpplan estimate model.py --device cpu --gpus 2    # what a CPU (gloo) run allocates
      dpplan profile model.py --gpus 4                  # short real runs, measured beside the estimates
      dpplan report plan.json -o plan.html              # a saved plan or profile as HTML
      dpplan gpus                                       # the GPU catalog

    Each command's --help lists its flags; the model-file contract is in the README."""
    _quiet_third_party_warnings()


THIRD_PARTY_MODULES = (r"(torch|torchvision|torchaudio|transformers|deepspeed|accelerate|huggingface_hub|safetensors"
                       r"|tokenizers)(\.|$)")
"""Libraries whose own warnings dpplan's commands do not show (a regex of module names, as
warnings.filterwarnings matches them)."""
QUIETED_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, UserWarning)


def _quiet_third_party_warnings() -> None:
    """Deprecation and usage warnings that torch, transformers or DeepSpeed raise from their own
    code (transformers' FutureWarning on gradient_checkpointing_enable, torch's on its private
    APIs) are not the user's to act on and would sit between dpplan's lines. dpplan's own
    messages are its output and errors, not Python warnings, and a warning raised by the user's
    model file is still shown. transformers' logger (e.g. "`loss_type=None` was set in the
    config but it is unrecognized") is set to errors only, unless TRANSFORMERS_VERBOSITY says
    otherwise; it reads the variable when it is first imported, which is after this. Profile
    workers inherit it; what else they print goes to their rank logs, not the terminal."""
    import warnings

    for category in QUIETED_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_MODULES)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@main.command()
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--strategy", "strategies", type=STRATEGY_LIST, default="all", show_default=True,
              help=f"Comma list or 'all' of: {', '.join(STRATEGIES)}.")
@click.option("--gpus", type=POSITIVE_INT_LIST, default="1,2,4,8", show_default=True,
              help="Total GPUs (ranks); a comma list plans each.")
@click.option("--nodes", "--nnodes", "nodes", type=click.IntRange(min=1), default=None,
              help="Nodes every GPU count spans (--nnodes as in torchrun)  [default: gpus / --gpus-per-node]")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=None,
              help="Nodes = gpus / this (one node below it), instead of --nodes  [default: the GPU's usual node "
                   "(`dpplan gpus`): 8 for h100-80gb; --device cpu: one node]")
@run_options
@click.option("--gpu", type=GPU_NAME, default=DEFAULT_GPU, show_default=True, help="GPU model (see `dpplan gpus`).")
@click.option("--device", type=click.Choice(PLAN_DEVICES), default="cuda", show_default=True,
              help="cuda: GPU memory; cpu: the tensor bytes of a CPU (gloo) run, for validation without GPUs.")
@click.option("--cpu-isa", type=click.Choice(tuple(CPU_ISAS)), default="native", show_default=True,
              help="--device cpu: plan the CPU kernels of this instruction set (this CPU's or a lower one).")
@HEADROOM_OPTION
@click.option("--json", "json_path", metavar="PATH|-", default=None, help="Also write the plan as JSON ('-': stdout only).")
@html_options
def estimate(model, gpus, nodes, gpus_per_node, deepspeed_config, gpu, device, cpu_isa, headroom_pct, json_path,
             html_path, plotlyjs, **run_flags):
    """Plan per-GPU memory of MODEL for each strategy.

    MODEL is a model file (path.py or path.py:factory) or a model by name: a Hugging Face
    config.json, a directory holding one, a Hub id (org/name: from the local cache, else its
    config.json downloaded unless HF_HUB_OFFLINE=1; pip install "dpplan[hf]"), timm:NAME or
    torchvision:NAME. Without MODEL, plans dpplan's bundled GPT model. Nothing is allocated:
    the model is built and run on a fake device. GPU counts span nodes of the GPU's usual
    size (8 H100s per node: --gpus 16 is 2 nodes) unless --nodes or --gpus-per-node says
    otherwise. The output ends with one line saying what to run.

    \b
    Examples:
      dpplan estimate
      dpplan estimate model.py --strategy ddp,fsdp-full --gpus 8,16 --batch-size 4
      dpplan estimate Qwen/Qwen2.5-7B --strategy fsdp2 --gpus 8 --seq-len 4096
      dpplan estimate path/to/config.json --gpus 8
      dpplan estimate model.py --gpus 64 --nodes 8 --gpu a100-80gb --activation-checkpointing
      dpplan estimate model.py --json plan.json --html plan.html
      dpplan estimate model.py --deepspeed-config ds_config.json --gpus 8
    """

    if nodes is not None and gpus_per_node is not None:
        raise click.UsageError("give either --nodes or --gpus-per-node, not both")

    if cpu_isa != "native" and device != "cpu":
        raise click.UsageError("--cpu-isa applies to --device cpu only")

    def action():
        if device == "cpu":
            apply_cpu_isa(cpu_isa)  # before torch loads: oneDNN and ATen read their caps once
        from dpplan.planner.estimate import estimate as plan_memory
        from dpplan.reports.plan_json import plan_document
        from dpplan.reports.plan_table import render_plan

        run, strategies = run_spec(model, run_flags, deepspeed_config, gpus)
        plan_gpus = gpus
        if run.tp > 1 and run.pp == 1 and run.cp == 1:
            # --tp without --strategy or --gpus: what combines with it, on multiples of it
            strategies = _tensor_parallel_default("strategies", strategies, TENSOR_PARALLEL_STRATEGIES)
            plan_gpus = _tensor_parallel_default("gpus", gpus, tuple(run.tp * g for g in DEFAULT_GPU_COUNTS))
        if run.pp > 1:  # likewise for --pp: one pipeline, DDP or FSDP2 over pipelines, on multiples of it
            strategies = _tensor_parallel_default(
                "strategies", strategies,
                ("single",) if run.pp_schedule in SPLIT_BACKWARD_SCHEDULES else
                tuple(s for s in PIPELINE_PARALLEL_STRATEGIES if run.tp == 1 or s in TENSOR_PARALLEL_STRATEGIES))
            plan_gpus = _tensor_parallel_default("gpus", gpus, tuple(run.tp * run.pp * g for g in DEFAULT_GPU_COUNTS))
        if run.cp > 1:  # likewise for --cp: fsdp2 on multiples of cp x tp
            strategies = _tensor_parallel_default("strategies", strategies, CONTEXT_PARALLEL_STRATEGIES)
            plan_gpus = _tensor_parallel_default("gpus", gpus, tuple(run.tp * run.cp * g for g in DEFAULT_GPU_COUNTS))
        if run.ep > 1:  # likewise for --ep: fsdp2 on multiples of it
            strategies = _tensor_parallel_default("strategies", strategies, EXPERT_PARALLEL_STRATEGIES)
            plan_gpus = _tensor_parallel_default("gpus", gpus, tuple(run.ep * g for g in DEFAULT_GPU_COUNTS))
        config = PlanConfig(run=run, strategies=strategies, gpus=plan_gpus, nodes=nodes, gpus_per_node=gpus_per_node,
                            gpu=gpu, device=device, cpu_isa=cpu_isa, headroom_pct=headroom_pct)
        if html_path:
            _check_html_destination(html_path)
        document = plan_document(plan_memory(config), command=_command_line())
        if json_path != "-":
            render_plan(document)
        _write_outputs(document.to_json(), json_path, html_path, plotlyjs)
        _skip_teardown_at_exit()

    _run_safely(action)


@main.command()
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--strategy", "strategies", type=STRATEGY_LIST, default=",".join(DEFAULT_PROFILE_STRATEGIES), show_default=True,
              help=f"Comma list or 'all' of: {', '.join(STRATEGIES)} "
                   "(dp: estimate only; zero1, zero2, zero3 need DeepSpeed installed).")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="Total ranks over all nodes, as in estimate  [default: every visible GPU; without GPUs 2 CPU ranks]")
@click.option("--nnodes", "--nodes", "nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes (torchrun --nnodes; --nodes as in estimate).")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="This node's rank (torchrun --node-rank).")
@click.option("--rdzv-endpoint", type=ENDPOINT, default=None, help="host:port of node 0 (torchrun --rdzv-endpoint).")
@run_options
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Timed optimizer steps per run  [default: 5 on GPUs, 2 on CPU ranks]")
@click.option("--warmup", "warmup_steps", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed optimizer steps first (the first creates the optimizer state).")
@click.option("--sample-hz", type=click.FloatRange(min=MIN_SAMPLE_HZ), default=100.0, show_default=True,
              help="NVML sampling rate of each GPU.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds one run may take before all its processes are stopped.")
@click.option("--device", type=click.Choice(PROFILE_DEVICES), default="auto", show_default=True,
              help="auto: GPUs if torch sees any, else CPU ranks (gloo).")
@click.option("--gpu", type=GPU_NAME, default=None,
              help="GPU model of the estimates; a smaller card than the one found is also tested for real, "
                   "as --gpu-memory does  [default: detected]")
@click.option("--gpu-memory", "gpu_memory_bytes", type=BYTE_SIZE, metavar="SIZE", default=None,
              help="Memory per rank to plan and test against, e.g. 24GiB (2^30), 24GB (10^9), 24000MiB. On GPUs each "
                   "rank is capped to it (torch.cuda.set_per_process_memory_fraction); on CPU ranks it is a planning "
                   "capacity only  [default: the GPU's memory; host RAM per rank]")
@HEADROOM_OPTION
@click.option("--find-batch-size", is_flag=True,
              help="Confirm the largest micro-batch per strategy with trial runs (each a fresh torchrun job); "
                   "without it the recommendation is predicted from the runs and the estimate.")
@click.option("--max-trials", type=click.IntRange(min=1), default=DEFAULT_MAX_TRIALS, show_default=True,
              help="Trial runs per strategy at most (--find-batch-size).")
@click.option("--trial-steps", type=click.IntRange(min=1), default=DEFAULT_TRIAL_STEPS, show_default=True,
              help="Timed steps of each trial, after the warm-up (at least one).")
@click.option("--force", is_flag=True,
              help="Launch runs whose estimate does not fit this machine's memory (host RAM of CPU ranks, "
                   "GPU memory) instead of refusing or skipping them.")
@click.option("--out", "out_dir", metavar="DIR", default=None,
              help="Results folder  [default: a new dpplan-runs/<timestamp>/]")
@click.option("--json", "json_path", metavar="PATH|-", default=None,
              help="Also write the merged profile JSON here ('-': stdout only).")
@html_options
def profile(model, gpus, nodes, node_rank, rdzv_endpoint, deepspeed_config, steps, warmup_steps, sample_hz, timeout_s,
            device, gpu, gpu_memory_bytes, headroom_pct, find_batch_size, max_trials, trial_steps, force, out_dir,
            json_path, html_path, plotlyjs, **run_flags):
    """Run MODEL for a few steps per strategy on real GPUs and measure its memory and speed.

    MODEL is what estimate takes: a model file (path.py[:factory]) or a model by name (a
    Hugging Face config.json, model directory or Hub id, timm:NAME, torchvision:NAME).

    One process per GPU through torch.distributed.run (NCCL); without GPUs the same
    strategies run as CPU processes with gloo. Each run is compared with the matching
    `dpplan estimate`. Results: DIR/profile.json (rewritten after every run) and per run
    a folder with each rank's JSON and logs.

    \b
    Examples:
      dpplan profile                                  # bundled model, works on a laptop
      dpplan profile model.py --gpus 4                # ddp and fsdp-full, a few steps each
      dpplan profile model.py --gpus 4 --html profile.html   # and a report to share
      dpplan profile model.py --gpus 8 --strategy ddp,fsdp2,zero1 --batch-size 8 \\
          --precision bf16-mixed --steps 20
      dpplan profile model.py --gpus 16 --nnodes 2 --node-rank 0 --rdzv-endpoint host:29400
                                                      # run the same on every node (node-rank 1 there)
      dpplan profile model.py --gpus 8 --find-batch-size --gpu a10g-24gb --headroom 10
                                                      # largest micro-batch per strategy on a 24 GB card
      dpplan profile model.py --pp 2 --grad-accum 4   # one 2-stage pipeline (1F1B, 4 micro-batches)
      dpplan profile model.py --pp 2 --gpus 4 --strategy ddp --pp-schedule zbv
                                                      # 2 pipelines, DDP over them
    """

    def action():
        from dpplan.profiler.profile import profile as run_profile
        from dpplan.reports.plan_json import write_json
        from dpplan.reports.profile_table import ProfileProgress, render_profile

        run, strategies = run_spec(model, run_flags, deepspeed_config, (gpus,) if gpus else ())
        ranks = gpus
        if run.pp > 1:  # --pp without --strategy: one pipeline, on tp x pp ranks unless --gpus says more
            strategies = _tensor_parallel_default("strategies", strategies, ("single",))
            if strategies == ("single",):
                ranks = _tensor_parallel_default("gpus", gpus, run.tp * run.pp)
        elif run.tp > 1 or run.ep > 1:  # --tp or --ep without --strategy: what runs over it
            strategies = _tensor_parallel_default("strategies", strategies, ("fsdp2",))
        config = ProfileConfig(
            run=run, strategies=strategies, gpus=ranks, nodes=nodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
            steps=steps, warmup_steps=warmup_steps, sample_hz=sample_hz, timeout_s=timeout_s, device=device,
            gpu=gpu, out_dir=out_dir, gpu_memory_bytes=gpu_memory_bytes, headroom_pct=headroom_pct,
            find_batch_size=find_batch_size, max_trials=max_trials, trial_steps=trial_steps,
        )
        progress = ProfileProgress()

        def on_start(strategy, index, count, commands):
            if nodes > 1:
                progress.notice(f"{strategy} as torchrun on each node: {commands['torchrun']}")
                progress.notice(f"{strategy} under SLURM: {commands['srun']}")
            progress.start(strategy, index, count)

        if html_path:
            _check_html_destination(html_path)
        try:
            document = run_profile(config, command=_command_line(), on_notice=progress.notice, on_start=on_start,
                                   on_done=progress.done, on_trial=progress.trial, force=force)
        except Interrupted as exc:
            progress.close()
            partial = exc.document
            if json_path and json_path != "-":
                write_json(partial, json_path)
            if html_path:  # the runs that finished, in the report too
                _write_html(partial, html_path, plotlyjs, quiet=True)
            raise
        finally:
            progress.close()
        if json_path != "-":
            render_profile(document)
        _write_outputs(document.to_json(), json_path, html_path, plotlyjs)
        failed = [r for r in document.runs if r.status == "failed"]
        if failed:
            detail = "; ".join(f"{r.settings.strategy}: {r.error}" for r in failed)
            raise RunFailed(f"{len(failed)} of {len(document.runs)} runs failed: {detail}")

    _run_safely(action)


def _check_html_destination(html_path: str, flag: str = "--html") -> None:
    """Refuse a bad --html path before minutes of work, not after."""
    from pathlib import Path

    parent = Path(html_path).parent
    if not parent.is_dir():
        raise UsageError(f"{flag}: directory does not exist: {parent}")


def _write_outputs(document: dict, json_path: str | None, html_path: str | None, plotlyjs: str) -> None:
    """--json and --html of estimate and profile; with ``--json -`` stdout carries the JSON only."""
    from dpplan.reports.plan_json import write_json

    if json_path:
        write_json(document, json_path)
        if json_path != "-":
            click.echo(f"wrote {json_path}")
    if html_path:
        _write_html(document, html_path, plotlyjs, quiet=json_path == "-")


def _write_html(document: dict, html_path: str, plotlyjs: str, *, quiet: bool) -> None:
    from dpplan.reports.html_report import write_report

    write_report(document, html_path, plotlyjs=plotlyjs)
    if not quiet:
        click.echo(f"wrote {html_path}")


@main.command()
@click.argument("json_file", metavar="JSON")
@click.option("-o", "--output", "html_path", metavar="PATH", default=None,
              help="The HTML file to write  [default: JSON's name with .html]")
@PLOTLYJS_OPTION
def report(json_file, html_path, plotlyjs):
    """Render a saved estimate or profile JSON as an HTML report.

    \b
    Examples:
      dpplan report plan.json                         # writes plan.html beside it
      dpplan report dpplan-runs/20261201-120000/profile.json -o report.html
      dpplan report plan.json -o plan.html --plotlyjs cdn
    """

    def action():
        from pathlib import Path

        from dpplan.reports.html_report import read_document

        document = read_document(json_file)
        destination = html_path or str(Path(json_file).with_suffix(".html"))
        _check_html_destination(destination, "--output")
        _write_html(document, destination, plotlyjs, quiet=False)

    _run_safely(action)


@main.command()
def gpus():
    """List the GPU catalog (names for --gpu), each with its memory and its usual node size."""
    from dpplan.planner.hardware import GPU_CATALOG
    from dpplan.reports.units import format_bytes

    for spec in GPU_CATALOG.values():
        default = "  (default)" if spec.name == DEFAULT_GPU else ""
        node = f"{spec.gpus_per_node}/node"
        click.echo(f"{spec.name:<20} {format_bytes(spec.memory_bytes):>11}  {node:>6}  {spec.description}{default}")


_EXIT_WITHOUT_TEARDOWN: list[bool] = []


def _skip_teardown_at_exit() -> None:
    """The command's work is done and written: ``run`` may end the process at once."""
    _EXIT_WITHOUT_TEARDOWN.append(True)


def run() -> None:
    """The ``dpplan`` program: ``main`` and then, after ``estimate``, exit without Python's
    teardown of torch's modules, which takes about 0.9 s (measured: ``python -c "import
    torch"`` 3.0-3.4 s, the same ending in ``os._exit(0)`` 2.2-2.6 s) and frees nothing the
    operating system would not. Output is flushed first; commands that start processes or
    own temporary files exit normally."""
    _EXIT_WITHOUT_TEARDOWN.clear()
    try:
        main.main(standalone_mode=True)
    except SystemExit as exc:
        if not _EXIT_WITHOUT_TEARDOWN or not isinstance(exc.code, (int, type(None))):
            raise
        code = exc.code or 0
    else:
        code = 0
    if not _EXIT_WITHOUT_TEARDOWN:
        raise SystemExit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a reader that left (| head) or a closed stream
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
