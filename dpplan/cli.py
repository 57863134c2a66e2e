"""dpplan's command line: a thin layer over planner/, profiler/ and reports/.

Examples:

    dpplan estimate                                   # the bundled model, all strategies, 1/2/4/8 GPUs
    dpplan estimate model.py                          # your model (see README: the model-file contract)
    dpplan estimate model.py --strategy fsdp-full,zero2 --gpus 64 --nodes 8 --batch-size 4 \\
        --precision bf16-mixed --activation-checkpointing --gpu a100-80gb
    dpplan estimate model.py --json plan.json         # the same, machine-readable (- for stdout)
    dpplan estimate model.py --device cpu --gpus 2    # what a CPU (gloo) run allocates
"""

from __future__ import annotations

import os
import shlex
import sys

import click

from dpplan import __version__
from dpplan.cli_types import GPU_NAME, POSITIVE_INT_LIST, STRATEGY_LIST
from dpplan.planner.config import DEVICES, OFFLOADS, PlanConfig
from dpplan.planner.hardware import DEFAULT_GPU
from dpplan.planner.optimizers import OPTIMIZERS
from dpplan.planner.strategies.layout import STRATEGIES
from dpplan.planner.training_step import PRECISIONS

USER_ERROR_EXIT = 2
RUNTIME_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _run_safely(action):
    """Turn the expected failures into one line and an exit code; never a traceback wall.

    Set DPPLAN_DEBUG=1 to see the traceback of an unexpected error.
    """
    from dpplan.planner.fake_device import FakeDeviceError
    from dpplan.planner.model_file import ModelFileError
    from dpplan.planner.trace import TraceError
    from dpplan.planner.units import WrapError

    try:
        return action()
    except (ModelFileError, TraceError, WrapError, ValueError) as exc:
        _fail(str(exc), USER_ERROR_EXIT)
    except KeyboardInterrupt:
        _fail("interrupted", INTERRUPTED_EXIT)
    except FakeDeviceError as exc:
        _fail(f"internal error while tracing: {exc}", RUNTIME_ERROR_EXIT)
    except Exception as exc:  # a bug of ours: one line, traceback on request
        if os.environ.get("DPPLAN_DEBUG"):
            raise
        _fail(f"{type(exc).__name__}: {exc} (set DPPLAN_DEBUG=1 for the traceback)", RUNTIME_ERROR_EXIT)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dpplan")
def main() -> None:
    """Plan and profile the memory of multi-GPU PyTorch training."""


@main.command()
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--strategy", "strategies", type=STRATEGY_LIST, default="all", show_default=True,
              help=f"Comma list or 'all' of: {', '.join(STRATEGIES)}.")
@click.option("--gpus", type=POSITIVE_INT_LIST, default="1,2,4,8", show_default=True,
              help="Total GPUs (ranks); a comma list plans each.")
@click.option("--nodes", type=click.IntRange(min=1), default=None, help="Nodes the GPUs span  [default: 1]")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=None,
              help="For sweeps over --gpus: nodes = gpus / this (instead of --nodes).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batch per GPU.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="bf16-mixed", show_default=True,
              help="fp32 | bf16-mixed (fp32 params, bf16 compute) | fp16-mixed (+ grad scaler) | bf16 (all bf16).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--activation-checkpointing", is_flag=True,
              help="The model's gradient_checkpointing_enable(), else non-reentrant checkpointing per unit.")
@click.option("--offload", type=click.Choice(OFFLOADS), default="none", show_default=True,
              help="Move optimizer state (and parameters) to host memory.")
@click.option("--wrap", metavar="CLASSNAME", default=None,
              help="FSDP / checkpointing unit class (default: children of the largest nn.ModuleList).")
@click.option("--gpu", type=GPU_NAME, default=DEFAULT_GPU, show_default=True, help="GPU model (see `dpplan gpus`).")
@click.option("--device", type=click.Choice(DEVICES), default="cuda", show_default=True,
              help="cuda: GPU memory; cpu: the tensor bytes of a CPU (gloo) run, for validation without GPUs.")
@click.option("--json", "json_path", metavar="PATH|-", default=None, help="Also write the plan as JSON ('-': stdout only).")
def estimate(model, strategies, gpus, nodes, gpus_per_node, batch_size, grad_accum, precision, optimizer,
             activation_checkpointing, offload, wrap, gpu, device, json_path):
    """Plan per-GPU memory of MODEL (path.py or path.py:factory) for each strategy.

    Without MODEL, plans dpplan's bundled GPT model. Nothing is allocated: the model is
    built and run on a fake device.

    \b
    Examples:
      dpplan estimate
      dpplan estimate model.py --strategy ddp,fsdp-full --gpus 8,16 --batch-size 4
      dpplan estimate model.py --gpus 64 --nodes 8 --gpu a100-80gb --activation-checkpointing
      dpplan estimate model.py --json plan.json
    """

    if nodes is not None and gpus_per_node is not None:
        raise click.UsageError("give either --nodes or --gpus-per-node, not both")

    def action():
        from dpplan.planner.estimate import estimate as plan_memory
        from dpplan.reports.plan_json import plan_to_json, write_json
        from dpplan.reports.plan_table import render_plan

        config = PlanConfig(
            model=model, strategies=strategies, gpus=gpus, nodes=nodes or 1, gpus_per_node=gpus_per_node,
            batch_size=batch_size,
            grad_accum=grad_accum, precision=precision, optimizer=optimizer,
            activation_checkpointing=activation_checkpointing, offload=offload, wrap=wrap,
            gpu=gpu, device=device,
        )
        plan = plan_memory(config)
        if json_path != "-":
            render_plan(plan)
        if json_path:
            command = "dpplan " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            write_json(plan_to_json(plan, command=command), json_path)
            if json_path != "-":
                click.echo(f"wrote {json_path}")

    _run_safely(action)


@main.command()
def gpus():
    """List the GPU catalog (names for --gpu)."""
    from dpplan.planner.hardware import GPU_CATALOG
    from dpplan.reports.units import format_bytes

    for spec in GPU_CATALOG.values():
        default = "  (default)" if spec.name == DEFAULT_GPU else ""
        click.echo(f"{spec.name:<20} {format_bytes(spec.memory_bytes):>11}  {spec.description}{default}")


if __name__ == "__main__":
    main()
