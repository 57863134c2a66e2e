"""One rank of a real, short training run, measured; launched by torchrun (or directly).

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m dpplan.profiler.worker --config-json '{"model": "m.py", "strategy": "ddp", ...}' --out DIR

Writes DIR/rank<R>.json. On CPU the measurement is exact live tensor bytes
(profiler/cpu_memory.py), recorder started before the process group and the model exist.
The steady-state peak is the largest level from the second step on, when optimizer state
already exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What one real run does; every field has the meaning of the same `dpplan estimate` flag."""

    model: str | None
    strategy: str
    batch_size: int = 1
    grad_accum: int = 1
    precision: str = "fp32"
    optimizer: str = "adamw"
    activation_checkpointing: bool = False
    wrap: str | None = None
    nodes: int = 1
    steps: int = 3
    """Optimizer steps; the first is warm-up (it creates the optimizer state)."""
    seed: int = 0
    keep_allocations: bool = False
    """Also write every allocation event (for investigating a mismatch)."""


def _rank_info() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


GLOO_SETTLE_S = 0.002
_SETTLED_COLLECTIVES = ("reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single", "all_gather_into_tensor")


def _settle_gloo_collectives(dist) -> None:
    """Give gloo's worker thread a moment after each blocking collective.

    gloo runs a collective on its own thread, which still holds the work (and the copy of
    the input that reduce-scatter makes) for a moment after the caller's wait returns;
    whether the caller's next allocation comes before or after that release is a scheduling
    race, so the peak of a loaded 2-core machine moved run to run by up to 2% (FSDP2,
    measured). Sleeping briefly after a blocking collective lets the worker release first,
    as it does on an idle machine. It changes no allocation, only their order in time."""
    for name in _SETTLED_COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def settled(*args, _original=original, **kwargs):
            work = _original(*args, **kwargs)
            if not kwargs.get("async_op", False):
                time.sleep(GLOO_SETTLE_S)
            return work

        setattr(dist, name, settled)


def run_rank(config: RunConfig, out_dir: Path) -> dict:
    from dpplan.profiler.cpu_memory import CpuMemoryRecorder

    recorder = CpuMemoryRecorder(keep_allocations=config.keep_allocations).start()
    import torch
    import torch.distributed as dist

    from dpplan.planner.model_file import build_module, call_user, load_model_file
    from dpplan.planner.training_step import autocast_context, run_training_step
    from dpplan.planner.units import checkpoint_units, find_units
    from dpplan.profiler.parallelize import parallelize

    rank, world, local_rank = _rank_info()
    device = torch.device("cpu")
    if world > 1 or "RANK" in os.environ:
        dist.init_process_group("gloo")
        _settle_gloo_collectives(dist)
    torch.manual_seed(config.seed + rank)

    spec = load_model_file(config.model)
    with recorder.mark("build"):
        model = build_module(spec).to(device)
        units = find_units(model, config.wrap)
        if config.activation_checkpointing:
            checkpoint_units(model, units)
        prepared = parallelize(
            model,
            config.strategy,
            units=units,
            precision=config.precision,
            optimizer_name=config.optimizer,
            device=device,
            num_nodes=config.nodes,
        )
    batch = call_user(spec, "example_batch()", spec.example_batch, config.batch_size)

    step_times = []
    for step in range(config.steps):
        start = time.perf_counter()
        with recorder.mark(f"step{step}"):
            run_training_step(
                prepared.model,
                prepared.optimizer,
                batch,
                spec.loss_fn,
                grad_accum=config.grad_accum,
                autocast=lambda: autocast_context(config.precision, device.type, prepared.uses_autocast),
                no_sync=prepared.no_sync,
                grad_scaler=prepared.grad_scaler,
                on_phase=recorder.mark,
            )
        step_times.append(time.perf_counter() - start)
    if dist.is_initialized():
        dist.barrier()
    timeline = recorder.stop()

    step_spans = [timeline.mark_spans(f"step{s}")[0] for s in range(config.steps)]
    step_peaks = [timeline.peak_between(a, b) for a, b in step_spans]
    build_span = timeline.mark_spans("build")[0]
    result = {
        "rank": rank,
        "world_size": world,
        "config": asdict(config),
        "process_wide_accounting": recorder.process_wide,
        "after_build_bytes": timeline.level_at(build_span[1]),
        "step_peak_bytes": step_peaks,
        "steady_peak_bytes": max(step_peaks[1:]) if len(step_peaks) > 1 else step_peaks[0],
        "after_step_bytes": [timeline.level_at(b) for _, b in step_spans],
        "step_time_s": step_times,
    }
    if config.keep_allocations:
        result["allocations"] = [
            [a.time_ns, a.delta_bytes, a.total_bytes, a.op_name] for a in timeline.allocations
        ]
        result["marks"] = timeline.marks
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-json", required=True, help="RunConfig as JSON")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    config = RunConfig(**json.loads(args.config_json))
    run_rank(config, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
