"""One rank of a real, short training run, measured; launched by torchrun (or directly).

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m dpplan.profiler.worker --config-json '{"model": "m.py", "strategy": "ddp", ...}' --out DIR

Builds the model on its device, wraps it per strategy, runs ``warmup_steps`` optimizer steps
(the first creates the optimizer state), then times ``steps`` more and writes DIR/rank<R>.json.
With tensor parallelism (tp > 1) the model is split over the tp ranks of a (dp, tp) mesh
first and the strategy wraps it over dp (profiler/tensor_parallel_run.py). With pipeline
parallelism (pp > 1) a rank holds its stages only and steps them with torch's schedule, one
batch of grad_accum micro-batches per step (profiler/pipeline_run.py).

cpu (gloo): exact live tensor bytes (profiler/cpu_memory.py; recorder started before the
process group and the model exist) and the process RSS. cuda (nccl, one GPU per process):
torch's allocator peaks per phase (profiler/cuda_memory.py, reset after warm-up) beside NVML
samples of the device (profiler/gpu_sampler.py). Peaks are over the timed steps only.

A failure is a result too: the rank writes its JSON with status "oom" or "failed" and the
error, prints the traceback to stderr, and exits non-zero, so torchrun stops the other ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from dpplan.config import RunConfig

OOM_EXIT = 3
FAILED_EXIT = 1
CPU_OOM_MESSAGES = ("out of memory", "can't allocate memory")
"""RuntimeError texts of an allocation failure (c10 DefaultCPUAllocator, older CUDA builds)."""


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


def _settle_functional_collectives() -> None:
    """The same settling for the functional collectives DTensor's tensor parallelism runs on
    (torch.distributed._functional_collectives, whose every wait, forward and backward, goes
    through the module's ``wait_tensor``): gloo's thread held the local logits shard that an
    all-gather had sent for a moment after the wait, and 1 run in 6 of a 2-rank tp run peaked
    4 MB (6%) higher (measured, tests/fixtures/tp_llama.py). Only tensor-parallel runs call it."""
    import torch.distributed._functional_collectives as funcol

    original = funcol.wait_tensor

    def settled(tensor, _original=original):
        waited = _original(tensor)
        time.sleep(GLOO_SETTLE_S)
        return waited

    funcol.wait_tensor = settled


def _to_device(batch, device):
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _measure(config: RunConfig, rank: int, world: int, local_rank: int) -> dict:
    cpu = config.device == "cpu"
    recorder = None
    if cpu:
        from dpplan.profiler.cpu_memory import CpuMemoryRecorder

        recorder = CpuMemoryRecorder(keep_allocations=config.keep_allocations).start()
    import torch
    import torch.distributed as dist

    from dpplan.profiler.memory_series import cuda_series
    from dpplan.training.batch_tokens import tokens_per_micro_batch
    from dpplan.training.model_file import example_batch_for, load_model_file
    from dpplan.training.training_step import autocast_context, run_training_step

    sampler = meter = None
    if cpu:
        device = torch.device("cpu")
    else:
        from dpplan.profiler.cuda_memory import CudaPhaseMeter
        from dpplan.profiler.gpu_sampler import GpuSampler

        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before any CUDA or NCCL call, or every rank makes a context on GPU 0
        if config.memory_limit_bytes is not None:
            # Before the model exists, so every allocation is under the cap. The cap is on the
            # caching allocator's reserve; context and NCCL sit outside it, which is why
            # recommend.py judges a trial by NVML's whole-device peak, not by this cap alone.
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, config.memory_limit_bytes / total), device)
        meter = CudaPhaseMeter(device)
        sampler = GpuSampler(local_rank, rate_hz=config.sample_hz).start()
    try:
        if world > 1 or "RANK" in os.environ:
            dist.init_process_group("gloo" if cpu else "nccl")
            if cpu:
                _settle_gloo_collectives(dist)
        mesh = split_bytes = expert_meshes = experts = pipeline_meshes = pipeline = None
        if config.run.pp > 1:
            from dpplan.profiler import pipeline_run

            if cpu and config.run.tp > 1:
                _settle_functional_collectives()
            pipeline_meshes = pipeline_run.pipeline_meshes(config, world, device.type)
            torch.manual_seed(pipeline_run.data_parallel_seed(config, rank, world))
        elif config.run.ep > 1:
            from dpplan.profiler import expert_parallel_run

            if cpu:
                _settle_functional_collectives()
            expert_meshes = expert_parallel_run.expert_meshes(config, world, device.type)
            torch.manual_seed(config.seed + rank)
        elif config.run.tp > 1:
            from dpplan.profiler import tensor_parallel_run

            if cpu:
                _settle_functional_collectives()
            mesh = tensor_parallel_run.tensor_parallel_mesh(config, world, device.type)
            torch.manual_seed(tensor_parallel_run.data_parallel_seed(config, rank))
        else:
            torch.manual_seed(config.seed + rank)

        spec = load_model_file(config.run.model)
        build_mark = recorder.mark("build") if recorder else contextlib.nullcontext()
        with build_mark:
            if pipeline_meshes is not None:  # this rank's stages only (profiler/pipeline_run.py)
                pipeline = pipeline_run.build_pipeline_rank(spec, config, pipeline_meshes, device)
            else:
                prepared, split_bytes, experts = _build_replica(spec, config, device, mesh, expert_meshes)
        if pipeline is not None:  # a step's micro-batches, one batch the schedule splits
            batch = _to_device(
                example_batch_for(spec, config.run.batch_size * config.run.grad_accum, config.run.seq_len), device)
        else:
            batch = _to_device(example_batch_for(spec, config.run.batch_size, config.run.seq_len), device)
            batch = prepared.cast_batch(batch)

        if recorder:
            on_phase = recorder.mark

            def before_backward():
                with recorder.mark("backward"):
                    pass
        else:
            assert meter is not None, "cuda runs measure with a CudaPhaseMeter"
            on_phase, before_backward = meter.mark, meter.backward_starts

        loss_fn = spec.loss_fn
        losses: list[float] = []
        if mesh is not None:  # the ranks of a tp group must agree on every loss
            loss_fn = tensor_parallel_run.recording_loss(spec.loss_fn, losses)

        def step():
            if pipeline is not None:
                pipeline_run.run_step(pipeline, batch, precision=config.run.precision, device_type=device.type,
                                      on_phase=on_phase, before_backward=before_backward)
                return
            run_training_step(
                prepared.model, prepared.optimizer, batch, loss_fn,
                grad_accum=config.run.grad_accum,
                autocast=lambda: autocast_context(config.run.precision, device.type, prepared.uses_autocast),
                no_sync=prepared.no_sync, grad_scaler=prepared.grad_scaler,
                on_phase=on_phase, before_backward=before_backward, backward=prepared.backward,
            )

        step_times = []
        step_starts_s = []
        timed_start_s = None
        for index in range(config.warmup_steps + config.steps):
            if index == config.warmup_steps:
                if meter:
                    torch.cuda.synchronize(device)
                    meter.restart()
                timed_start_s = time.perf_counter()
            start = time.perf_counter()
            step_starts_s.append(start)
            with (recorder.mark(f"step{index}") if recorder else contextlib.nullcontext()):
                step()
            if not cpu:
                torch.cuda.synchronize(device)  # kernels run asynchronously: time them to the end
            if index >= config.warmup_steps:
                step_times.append(time.perf_counter() - start)
        timed_end_s = time.perf_counter()
        if dist.is_initialized():
            dist.barrier()

        measured: dict[str, Any] = {
            "step_time_s": statistics.median(step_times),
            "step_times_s": step_times,
            "samples_per_step": config.run.batch_size * config.run.grad_accum,
            "tokens_per_step": (tokens_per_micro_batch(batch) if pipeline is not None  # the batch is the step's
                                else _times(tokens_per_micro_batch(batch), config.run.grad_accum)),
        }
        if pipeline_meshes is not None and pipeline is not None:
            measured["pipeline"] = pipeline_run.rank_record(config, pipeline_meshes, pipeline)
        if mesh is not None and split_bytes is not None:
            measured["tensor_parallel"] = tensor_parallel_run.rank_record(config, mesh, split_bytes, losses, batch)
        if expert_meshes is not None and experts is not None:
            measured["expert_parallel"] = expert_parallel_run.rank_record(config, expert_meshes, experts)
        if recorder:
            measured.update(_cpu_memory(recorder, config))
            import psutil

            measured["rss_bytes"] = psutil.Process().memory_info().rss
            # ru_maxrss is the whole process's high-water mark (imports included); the kernel
            # updates it lazily, so it can trail the current RSS by a few pages.
            measured["peak_rss_bytes"] = max(_peak_rss_bytes(), measured["rss_bytes"])
        else:
            assert meter is not None and sampler is not None and timed_start_s is not None
            measured.update(meter.result())
            measured.update(_nvml_memory(sampler, timed_start_s, timed_end_s))
            measured["memory_series"] = cuda_series(
                origin_s=step_starts_s[0], step_starts_s=step_starts_s, end_s=timed_end_s,
                warmup_steps=config.warmup_steps, torch_points=meter.points, nvml_samples=sampler.stop(),
            )
            measured["gpu_name"] = torch.cuda.get_device_name(device)
            measured["gpu_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
        return measured
    finally:
        if sampler is not None:
            sampler.stop()  # safe twice; a failed run must not leave the sampling thread


def _build_replica(spec, config: RunConfig, device, mesh, expert_meshes):
    """The whole model on ``device``, split (tp, ep), checkpointed and wrapped for the strategy:
    (PreparedRun, the tensor-parallel split's bytes, the expert units)."""
    import torch

    from dpplan.profiler.parallelize import parallelize
    from dpplan.training.model_file import build_module
    from dpplan.training.units import checkpoint_units, find_units

    split_bytes = experts = None
    # On cuda the model is built on its GPU directly: a large model never sits in host memory.
    with (torch.device(device) if device.type != "cpu" else contextlib.nullcontext()):
        model = build_module(spec)
    model = model.to(device)
    if mesh is not None:  # tensor parallelism first, then checkpointing and the wrapper
        from dpplan.profiler import tensor_parallel_run

        split_bytes = tensor_parallel_run.split_model(model, spec, config, mesh)
    if expert_meshes is not None:  # likewise expert parallelism
        from dpplan.profiler import expert_parallel_run

        experts = expert_parallel_run.split_experts(model, expert_meshes)
    units = find_units(model, config.run.wrap)
    if config.run.activation_checkpointing:
        checkpoint_units(model, units)
    prepared = parallelize(
        model, config.strategy, units=units, precision=config.run.precision, optimizer_name=config.run.optimizer,
        device=device, num_nodes=config.nodes, offload=config.run.offload,
        batch_size=config.run.batch_size, grad_accum=config.run.grad_accum, zero=config.run.zero,
        dp_mesh=mesh["dp"] if mesh is not None else expert_meshes.dp if expert_meshes is not None else None,
        experts=experts,
    )
    return prepared, split_bytes, experts


def _times(value: int | None, factor: int) -> int | None:
    return None if value is None else value * factor


def _cpu_memory(recorder, config: RunConfig) -> dict:
    from dpplan.profiler.memory_series import cpu_series

    timeline = recorder.stop()
    total_steps = config.warmup_steps + config.steps
    step_spans = [timeline.mark_spans(f"step{s}")[0] for s in range(total_steps)]
    step_peaks = [timeline.peak_between(a, b) for a, b in step_spans]
    timed = step_spans[config.warmup_steps:]
    phases = {"forward": 0, "backward": 0, "optimizer": 0}
    backward_marks = [start for start, _ in timeline.mark_spans("backward")]
    for first, last in timed:
        for start, end in timeline.mark_spans("micro_batch"):
            if not first <= start <= last:
                continue
            turn = next((b for b in backward_marks if start <= b <= end), end)
            phases["forward"] = max(phases["forward"], timeline.peak_between(start, turn))
            phases["backward"] = max(phases["backward"], timeline.peak_between(turn, end))
        for start, end in timeline.mark_spans("optimizer"):
            if first <= start <= last:
                phases["optimizer"] = max(phases["optimizer"], timeline.peak_between(start, end))
    peak = max(step_peaks[config.warmup_steps:])
    build_span = timeline.mark_spans("build")[0]
    result = {
        "process_wide_accounting": recorder.process_wide,
        "after_build_bytes": timeline.level_at(build_span[1]),
        "step_peak_bytes": step_peaks,
        "peak_allocated_bytes": peak,
        "steady_peak_bytes": peak,
        "phase_peak_allocated_bytes": phases,
        "after_step_bytes": [timeline.level_at(b) for _, b in step_spans],
        "memory_series": cpu_series(timeline, warmup_steps=config.warmup_steps, num_steps=total_steps),
    }
    if config.keep_allocations:
        result["allocations"] = [[a.time_ns, a.delta_bytes, a.total_bytes, a.op_name] for a in timeline.allocations]
        result["marks"] = timeline.marks
    return result


def _nvml_memory(sampler, start_s: float, end_s: float) -> dict:
    from dpplan.profiler.gpu_sampler import samples_between, summarize_samples

    samples = sampler.stop()
    summary = summarize_samples(samples_between(samples, start_s, end_s))
    return {
        "peak_nvml_bytes": summary["peak_used_bytes"],
        "nvml": summary,
        "nvml_notice": sampler.notice,
        "nvml_device": sampler.device_description,
        "nvml_process_used_bytes": sampler.process_used_bytes,
    }


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in CPU_OOM_MESSAGES)


def describe_error(exc: BaseException, model: str | None) -> str:
    """One line: the deepest frame in the user's model file when there is one."""
    from dpplan.training.model_file import ModelFileError, describe_user_exception, split_model_argument

    if isinstance(exc, ModelFileError):
        return str(exc)
    path, _ = split_model_argument(model)
    try:
        return describe_user_exception(exc, path.resolve())
    except OSError:
        return f"{type(exc).__name__}: {exc}"


def run_rank(config: RunConfig, out_dir: Path) -> dict:
    """Measure this rank; write rank<R>.json whatever happens. Raises after writing on failure."""
    rank, world, local_rank = _rank_info()
    result = {
        "rank": rank,
        "local_rank": local_rank,
        "world_size": world,
        "hostname": socket.gethostname(),
        "config": config.to_json(),
        "status": "ok",
        "error": None,
    }
    failure = None
    try:
        result.update(_measure(config, rank, world, local_rank))
    except Exception as exc:
        failure = exc
        result["status"] = "oom" if is_out_of_memory(exc) else "failed"
        result["error"] = describe_error(exc, config.run.model)
        result["failed_at"] = time.time()  # the earliest failure across ranks is the root cause
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(result))
    path.with_suffix(".tmp").replace(path)  # never a half-written file for the parent to read
    if failure is not None:
        raise failure
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-json", required=True, help="RunConfig as JSON")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    config = RunConfig.from_json(json.loads(args.config_json))
    try:
        run_rank(config, args.out)
    except Exception as exc:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave at once: interpreter shutdown could wait on a collective or a process-group
        # thread that will never finish now; torchrun sees the exit code and stops the others.
        os._exit(OOM_EXIT if is_out_of_memory(exc) else FAILED_EXIT)
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is written and the process group destroyed: skip the interpreter's teardown
    # of torch, which took 3-4 s per rank on a 2-core machine (measured), on every run.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
