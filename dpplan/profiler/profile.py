"""``dpplan profile``: real short runs per strategy, measured, beside their estimates.

config -> device (GPUs found, else CPU ranks with gloo) -> the matching estimate plan ->
per strategy: one torchrun job (profiler/launch.py) of profiler/worker.py ranks -> their
rank<R>.json merged into a run (profiler/profile_results.py) -> profile.json
(profiler/profile_document.py), rewritten after every run so that an interrupted profile
keeps what it measured.

Layout of ``out_dir``: profile.json; per run a folder ``<n>-<strategy>/`` with rank<R>.json,
launcher.log (torchrun's own output) and logs/ (each rank's stdout.log and stderr.log).

After the runs, ``recommendations`` (profiler/recommend.py): per strategy the largest
micro-batch that fits the capacity less a headroom, calibrated by what was measured and, with
``find_batch_size``, confirmed by trial jobs (folders ``<n>-<strategy>/trial-b<batch>/``), the
offload needed, and the fastest strategy that fits. ``gpu_memory_bytes`` (or a smaller ``gpu``
than the one found) is the capacity tested: on cuda every run and trial is capped to it with
torch.cuda.set_per_process_memory_fraction, so a smaller card is tested for real.

Strategies that cannot run are recorded as ``skipped`` with the reason and their estimate:
zero1/zero2/zero3 without DeepSpeed installed (they run through deepspeed.initialize,
profiler/deepspeed_run.py), dp, one process driving every GPU (nn.DataParallel), not one
process per GPU, and single on more than one GPU; and, unless ``force``, a run whose estimate
does not fit this machine's memory (profiler/launch_fit.py; when no run fits, the profile is
refused before anything is launched).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dpplan import __version__
from dpplan.config import PlanConfig, ProfileConfig, RunConfig
from dpplan.errors import Interrupted, RunTimedOut, UsageError
from dpplan.planner.hardware import DEFAULT_GPU
from dpplan.planner.plan import ModelSummary, StrategyEstimate
from dpplan.profiler import launch_fit
from dpplan.profiler import profile_results as results
from dpplan.profiler import recommend as recommendations
from dpplan.profiler.batch_search import Trial, judge
from dpplan.profiler.host_memory import MemoryCeiling, available_memory
from dpplan.profiler.launch import (
    LaunchSpec,
    rank_log,
    run_process_tree,
    tail,
    user_commands,
    worker_command,
)
from dpplan.profiler.profile_document import DeviceInfo, ProfileDocument, write_profile
from dpplan.profiler.rank_exits import rank_exits
from dpplan.profiler.rank_watch import RankMemoryWatch
from dpplan.profiler.recommendation_results import Recommendations
from dpplan.profiler.target import (
    Target,
    capacity_override,
    capacity_source,
    memory_limit_bytes,
    resolve_target,
    skip_reason,
)

DEFAULT_RUNS_DIR = "dpplan-runs"
DEFAULT_GPU_STEPS = 5
DEFAULT_CPU_STEPS = 2


def default_out_dir(now: datetime | None = None) -> Path:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path(DEFAULT_RUNS_DIR) / stamp
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{stamp}-{n}")
    return path


def estimate_entries(
    config: ProfileConfig, target: Target
) -> tuple[ModelSummary, dict[str, StrategyEstimate], dict[str, str]]:
    """The model summary, the estimate of each strategy, for exactly the runs profiled (cpu
    runs: ``--device cpu`` estimates; cuda: the detected GPU), and the strategies whose
    wrapper refuses the model, with its reason."""
    from dpplan.planner.estimate import estimate

    plan = estimate(plan_config(config, target, config.strategies))
    return plan.model, {e.strategy: e for e in plan.estimates}, dict(plan.unsupported)


def plan_config(config: ProfileConfig, target: Target, strategies: tuple[str, ...], *, batch_size: int | None = None,
                offload: str | None = None, capacity_bytes: int | None = None) -> PlanConfig:
    """The estimate request matching the runs, at another micro-batch, offload or capacity when given."""
    changes: dict[str, Any] = {k: v for k, v in (("batch_size", batch_size), ("offload", offload)) if v is not None}
    run = replace(config.run, **changes)
    # headroom 0: recommend.py keeps the profile's headroom off the calibrated peaks itself, and
    # asks for max_batch_size against the limit it has computed (capacity_bytes)
    return PlanConfig(
        run=run, strategies=strategies, gpus=(target.gpus,), nodes=config.nodes, gpu=target.gpu or DEFAULT_GPU,
        device=target.device, capacity_bytes=capacity_override(config, target) if capacity_bytes is None else capacity_bytes,
        headroom_pct=0.0,
    )


def estimate_function(config: ProfileConfig, target: Target) -> recommendations.EstimateAt:
    """``estimate_at(strategy, batch_size=, offload=, capacity_bytes=)`` for recommend.py: one
    model load, each distinct question estimated once."""
    from dpplan.planner.estimate import estimate
    from dpplan.training.model_file import load_model_file

    spec = load_model_file(config.run.model)
    answers: dict[tuple, StrategyEstimate] = {}

    def estimate_at(strategy, *, batch_size, offload=None, capacity_bytes=None):
        key = (strategy, batch_size, offload, capacity_bytes)
        if key not in answers:
            request = plan_config(config, target, (strategy,), batch_size=batch_size, offload=offload,
                                  capacity_bytes=capacity_bytes)
            answers[key] = estimate(request, spec).estimates[0]
        return answers[key]

    return estimate_at


def misfit(config: ProfileConfig, target: Target, estimate: StrategyEstimate, host: MemoryCeiling) -> str | None:
    """Why the run of ``estimate`` cannot fit this machine (profiler/launch_fit.py), or None."""
    ranks_on_node = target.gpus // config.nodes
    unit = "GPU" if target.device == "cuda" else "CPU rank"
    where = f"{target.gpus} {unit}{'s' if target.gpus > 1 else ''}"
    if config.nodes > 1:
        where += f" ({ranks_on_node} on this node)"
    cap = memory_limit_bytes(config, target)
    return launch_fit.misfit(estimate, device=target.device, where=where, ranks_on_node=ranks_on_node, host=host,
                             gpu_bytes=cap or target.total_bytes,
                             gpu_source="each rank is capped to" if cap else "the GPU has")


def run_config(config: ProfileConfig, strategy: str, target: Target) -> RunConfig:
    assert config.steps is not None, "profile() sets the device's default number of steps first"
    return RunConfig(
        run=config.run, strategy=strategy, nodes=config.nodes, steps=config.steps, warmup_steps=config.warmup_steps,
        device=target.device, sample_hz=config.sample_hz, memory_limit_bytes=memory_limit_bytes(config, target),
    )


def run_notes(strategy: str, target: Target, config: ProfileConfig) -> tuple[str, ...]:
    if config.nodes > 1:
        return (f"measured on node {config.node_rank} only: each node writes its own ranks",)
    return ()


def launch_spec(config: ProfileConfig, target: Target, run_dir: Path) -> LaunchSpec:
    return LaunchSpec(
        nproc_per_node=target.gpus // config.nodes, nnodes=config.nodes, node_rank=config.node_rank,
        rdzv_endpoint=config.rdzv_endpoint, log_dir=run_dir / "logs",
    )


def launch_commands(config: ProfileConfig, strategy: str, target: Target, run_dir: Path) -> dict[str, str]:
    """The run as torchrun and srun command lines, for users who launch themselves."""
    config_json = json.dumps(run_config(config, strategy, target).to_json())
    return user_commands(launch_spec(config, target, run_dir), config_json, str(run_dir))


def profile_one(config: ProfileConfig, strategy: str, target: Target, run_dir: Path) -> results.LaunchedRun:
    """Launch one run, wait for it, and merge what its ranks wrote."""
    spec = launch_spec(config, target, run_dir)
    config_json = json.dumps(run_config(config, strategy, target).to_json())
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    returncode, timed_out = None, None
    watch = RankMemoryWatch(num_ranks=spec.nproc_per_node)
    try:
        completed = run_process_tree(
            worker_command(spec, config_json, run_dir), env=env, timeout_s=config.timeout_s,
            output=run_dir / "launcher.log", on_start=watch.start,
        )
        returncode = completed.returncode
    except RunTimedOut as exc:
        timed_out = str(exc)
    finally:
        evidence = watch.stop()
    first = config.node_rank * spec.nproc_per_node
    expected = list(range(first, first + spec.nproc_per_node))
    rank_results = {}
    for rank in expected:
        path = run_dir / f"rank{rank}.json"
        if path.exists():
            rank_results[rank] = json.loads(path.read_text())
    assert spec.log_dir is not None  # launch_spec always gives the ranks a log folder
    stderr_tail = {rank: tail(rank_log(spec.log_dir, rank - first)) for rank in expected}
    launcher_log = run_dir / "launcher.log"
    outcome = results.outcome(
        strategy=strategy, batch_size=config.run.batch_size, gpus=target.gpus, device=target.device,
        expected_ranks=expected, results=rank_results, returncode=returncode, timed_out=timed_out,
        stderr_tail=stderr_tail, launcher_tail=tail(launcher_log),
        exits=rank_exits(launcher_log.read_text(errors="replace")) if launcher_log.exists() else {}, evidence=evidence,
    )
    # the ranks of one tp group or one pipeline train on one batch: throughput counts replicas
    replicas = target.gpus // (config.run.tp * config.run.pp)
    return results.launched_run(outcome=outcome, results=rank_results, expected_ranks=expected,
                                num_replicas=replicas, stderr_tail=stderr_tail,
                                commands=launch_commands(config, strategy, target, run_dir))


def run_settings(config: ProfileConfig, strategy: str, target: Target) -> results.RunSettings:
    run = config.run
    return results.RunSettings(
        strategy=strategy, gpus=target.gpus, nodes=config.nodes, batch_size=run.batch_size,
        grad_accum=run.grad_accum, precision=run.precision, optimizer=run.optimizer,
        activation_checkpointing=run.activation_checkpointing, offload=run.offload, device=target.device,
        tp=run.tp, sequence_parallel=run.sequence_parallel, ep=run.ep, pp=run.pp,
        pp_schedule=run.pp_schedule if run.pp > 1 else None,
    )


def trial_function(config: ProfileConfig, target: Target, out_dir: Path, estimate_at,
                   limit_bytes: int, on_trial: Callable[[str, Trial], None] | None,
                   force: bool = False) -> recommendations.RunTrial:
    """``run_trial(strategy, batch)``: one fresh torchrun job, as the profile runs are, with at
    least one warm-up step and ``trial_steps`` timed steps, judged against ``limit_bytes``. A
    trial whose estimate does not fit this machine is not launched (unless ``force``): it is
    ``not_run``, and the search stops there."""

    def run_trial(strategy: str, batch_size: int) -> Trial:
        line = None if force else misfit(config, target, estimate_at(strategy, batch_size=batch_size),
                                         available_memory())
        if line is not None:
            trial = Trial(batch_size=batch_size, status="not_run", peak_bytes=None, limit_bytes=limit_bytes,
                          error=f"not launched: {line}")
            if on_trial:
                on_trial(strategy, trial)
            return trial
        trial_config = replace(config, run=replace(config.run, batch_size=batch_size), steps=config.trial_steps,
                               warmup_steps=max(1, config.warmup_steps))
        index = config.strategies.index(strategy)
        trial_dir = out_dir / f"{index + 1}-{strategy}" / f"trial-b{batch_size}"
        start = time.perf_counter()
        launched = profile_one(trial_config, strategy, target, trial_dir)
        status, error, _ = launched.outcome
        measured = launched.measured if status == results.RunStatus.OK else None
        peak, _ = recommendations.fit_bytes(measured, estimate_at(strategy, batch_size=batch_size), target.device)
        trial = judge(batch_size, str(status), peak if measured else None, limit_bytes,
                      samples_per_s=measured.samples_per_s if measured else None,
                      step_time_s=measured.step_time_s if measured else None,
                      step_time_spread_s=measured.step_time_spread_s if measured else None,
                      seconds=time.perf_counter() - start, error=error, dir=str(trial_dir))
        if on_trial:
            on_trial(strategy, trial)
        return trial

    return run_trial


def recommend_runs(config: ProfileConfig, target: Target, runs: tuple[results.RunResult, ...], out_dir: Path,
                   on_trial: Callable[[str, Trial], None] | None = None, force: bool = False) -> Recommendations | None:
    """The recommendations section: predicted from the runs, confirmed by trials when asked.
    Only for the runs the planner has an estimate of (not one of a single-device strategy on
    more ranks than one replica spans); None when there is none."""
    runs = tuple(run for run in runs if run.estimate is not None)
    if not runs:
        return None
    estimate_at = estimate_function(config, target)
    capacity = estimate_at(runs[0].settings.strategy, batch_size=1).capacity_bytes
    limits = recommendations.Limits(capacity_bytes=capacity, headroom_pct=config.headroom_pct,
                                    capacity_source=capacity_source(config, target))
    notes = []
    if config.find_batch_size:
        run_trial = trial_function(config, target, out_dir, estimate_at, limits.limit_bytes, on_trial, force)
    else:
        run_trial = None
        notes.append("micro-batches are predicted, not confirmed: add --find-batch-size to confirm them with trial runs")
    if target.device == "cpu" and config.gpu_memory_bytes is not None:
        notes.append("CPU ranks: --gpu-memory is a planning capacity only (nothing caps the processes); "
                     "batches are judged by their measured tensor bytes")
    return recommendations.recommend(runs, device=target.device, limits=limits, estimate_at=estimate_at,
                                     run_trial=run_trial, max_trials=config.max_trials, notes=tuple(notes))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def profile(
    config: ProfileConfig,
    *,
    command: str | None = None,
    on_notice: Callable[[str], None] | None = None,
    on_start: Callable[[str, int, int, dict[str, str]], None] | None = None,
    on_done: Callable[[results.RunResult], None] | None = None,
    on_trial: Callable[[str, Trial], None] | None = None,
    force: bool = False,
) -> ProfileDocument:
    """Profile every strategy of ``config``; returns the profile document (also in out_dir/profile.json).

    Before anything is launched, each run's estimate is compared with this machine's memory
    (profiler/launch_fit.py): when none fits the profile is refused (UsageError), else the runs
    that do not fit are skipped; ``force`` launches them anyway, said in a notice.

    ``on_notice(line)`` says how the runs are made (no GPU: CPU ranks); ``on_start(strategy,
    index, count, commands)`` (commands: the same run as torchrun and srun lines) and
    ``on_done(run)`` report progress, ``on_trial(strategy, trial)`` each batch-size trial. Ctrl-C or
    SIGTERM stops the run in flight, its whole process tree included, writes profile.json with
    the finished runs and raises ``Interrupted``."""
    target = resolve_target(config)
    if config.steps is None:
        config = replace(config, steps=DEFAULT_GPU_STEPS if target.device == "cuda" else DEFAULT_CPU_STEPS)
    if config.find_batch_size and target.device == "cpu" and config.gpu_memory_bytes is None:
        raise UsageError("--find-batch-size on CPU ranks needs --gpu-memory SIZE (the capacity to test against): "
                         "the default, host RAM per rank, would be found by running the machine out of memory")
    capacity_override(config, target)  # --gpu-memory larger than the GPU: a usage error before any launch
    for notice in target.notices:
        if on_notice:
            on_notice(notice)
    model, estimates, unsupported = estimate_entries(config, target)  # a broken model file fails here, before any launch
    launchable = [s for s in config.strategies
                  if s not in unsupported and not skip_reason(s, target.gpus, config.run.tp, config.run.pp)]
    host = available_memory()
    misfits = {s: line for s in launchable if s in estimates and (line := misfit(config, target, estimates[s], host))}
    not_run, forced = launch_fit.decide(misfits, num_launchable=len(launchable), force=force)
    for notice in forced:
        if on_notice:
            on_notice(notice)
    out_dir = Path(config.out_dir) if config.out_dir else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    document = ProfileDocument(
        dpplan_version=__version__, created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command, config=config.to_json(), model=model,
        device=DeviceInfo(type=target.device, gpus=target.gpus, gpu=target.gpu, description=target.description),
        notices=target.notices + forced, out_dir=str(out_dir),
    )
    write_profile(document, out_dir)
    # A cancelled job (scancel, kill) cleans up like Ctrl-C. SIGINT is set explicitly too: a
    # process started in the background by a non-interactive shell inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler of its own.
    handled = (signal.SIGTERM, signal.SIGINT)
    in_main_thread = _is_main_thread()
    previous = {signum: signal.getsignal(signum) for signum in handled} if in_main_thread else {}
    for signum in previous:
        signal.signal(signum, _raise_interrupt)
    try:
        for index, strategy in enumerate(config.strategies):
            settings = run_settings(config, strategy, target)
            estimate, notes = estimates.get(strategy), run_notes(strategy, target, config)
            reason = skip_reason(strategy, target.gpus, config.run.tp, config.run.pp)
            if strategy in unsupported:
                reason = f"{strategy} cannot wrap this model: {unsupported[strategy]}"
            reason = reason or not_run.get(strategy)
            if reason:
                run = results.skipped_run(settings, reason=reason, estimate=estimate, notes=notes)
            else:
                run_dir = out_dir / f"{index + 1}-{strategy}"
                if on_start:
                    on_start(strategy, index, len(config.strategies), launch_commands(config, strategy, target, run_dir))
                start = time.perf_counter()
                launched = profile_one(config, strategy, target, run_dir)
                run = results.finished_run(settings, launched, estimate=estimate, notes=notes, dir=str(run_dir),
                                           duration_s=time.perf_counter() - start)
            document = document.with_run(run)
            write_profile(document, out_dir)
            if on_done:
                on_done(run)
        document = replace(document, recommendations=recommend_runs(config, target, document.runs, out_dir, on_trial,
                                                                          force))
        write_profile(document, out_dir)
    except KeyboardInterrupt:
        document = replace(document, interrupted=True)
        path = write_profile(document, out_dir)
        raise Interrupted(f"interrupted; {len(document.runs)} finished run(s) kept in {path}",
                          document=document.to_json(), path=path) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return document


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
