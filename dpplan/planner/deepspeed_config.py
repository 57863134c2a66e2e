"""``--deepspeed-config ds_config.json``: a user's DeepSpeed config read into the run it describes.

The file decides what it states: the ZeRO stage (the strategy), the precision section, the
offload, the micro-batch and accumulation, and the ZeRO settings a plan depends on
(strategies/zero_settings.py). ``"auto"`` is resolved as Hugging Face's Trainer resolves it
(transformers/integrations/deepspeed.py ``HfTrainerDeepSpeedConfig``): batch, accumulation and
precision from the command line, ``reduce_bucket_size`` = hidden_size², and at stage 3
``stage3_prefetch_bucket_size`` = int(0.9 · hidden_size²) and
``stage3_param_persistence_threshold`` = 10 · hidden_size, hidden_size read from the model's
``config``. A flag given on the command line that contradicts a value in the file is an error,
as the Trainer's ``fill_match`` makes it.

Every key is either planned, known to leave the memory of a training step alone (logging,
checkpoint saving, the learning-rate schedule), or refused with a one-line error naming it:
nothing is silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from dpplan.errors import UsageError
from dpplan.json_file import read_json
from dpplan.planner.strategies.zero_settings import ZeroSettings

AUTO = "auto"

# Each key of a config is planned, changes nothing a plan counts (monitoring, checkpoint files,
# schedules, the flags DeepSpeed needs to accept a torch optimizer), or is planned only at the
# values given (DeepSpeed's defaults: another value is a mode dpplan does not plan, named in
# the error). Any other key is refused by name.
PLANNED = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "fp16", "bf16", "torch_autocast", "zero_optimization",
}
NO_MEMORY_EFFECT = {
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "scheduler",
    "gradient_clipping", "tensorboard", "wandb", "csv_monitor", "comet", "monitor_config",
    "comms_logger", "flops_profiler", "checkpoint", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "seed", "disable_allgather", "timers",
}
ONLY_AT = {
    "prescale_gradients": ((False,), "prescale_gradients"),
    "communication_data_type": ((None,), "a communication_data_type other than the parameters'"),
    "gradient_predivide_factor": ((1.0,), "gradient_predivide_factor"),
}
ZERO_PLANNED = {
    "stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "offload_optimizer",
    "offload_param", "sub_group_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
    "stage3_max_reuse_distance", "stage3_param_persistence_threshold",
    # DeepSpeed also takes the stage-3 names without their "stage3_" prefix (pydantic aliases)
    "prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters", "max_reuse_distance",
}
ZERO_NO_MEMORY_EFFECT = {
    "allgather_partitions", "load_from_fp32_weights", "elastic_checkpoint",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "gather_16bit_weights_on_model_save", "ignore_unused_parameters", "use_multi_rank_bucket_allreduce",
    "log_trace_cache_warnings", "compute_grad_norm",
}
ZERO_ONLY_AT = {
    "contiguous_gradients": ((True,), "non-contiguous gradients (buffered_reduce_fallback)"),
    "reduce_scatter": ((True,), "all-reduce instead of reduce-scatter"),
    "round_robin_gradients": ((False,), "round-robin gradient partitioning"),
    "zero_hpz_partition_size": ((1,), "ZeRO++ hierarchical partitioning (hpZ)"),
    "zero_quantized_weights": ((False,), "ZeRO++ quantized weights (qwZ)"),
    "zero_quantized_nontrainable_weights": ((False,), "ZeRO++ quantized frozen weights"),
    "zero_quantized_gradients": ((False,), "ZeRO++ quantized gradients (qgZ)"),
    "mics_shard_size": ((-1, 0), "MiCS sharding"),
    "stage3_model_persistence_threshold": ((), "stage3_model_persistence_threshold"),
    "memory_efficient_linear": ((True,), "memory_efficient_linear=false"),
}
# deepspeed/ops/adam and torch: DeepSpeed's "optimizer" types and the optimizer of the same memory.
OPTIMIZER_TYPES = {"adam": "adam", "adamw": "adamw", "sgd": "sgd"}
HIDDEN_SIZE_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


@dataclass(frozen=True, kw_only=True)
class DeepSpeedRun:
    """What a config file says about the run, "auto" left to the command line (None)."""

    path: str
    strategy: str
    precision: str | None
    """fp32, bf16-mixed, fp16-mixed; None: "auto" (the --precision flag)."""
    offload: str
    optimizer: str | None
    batch_size: int | None
    grad_accum: int | None
    train_batch_size: int | None
    zero: ZeroSettings


def _error(path: str, message: str) -> UsageError:
    return UsageError(f"{path}: {message}")


def _number(path: str, key: str, value: Any) -> int | None:
    if value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or int(value) != value:
        raise _error(path, f'{key} must be a non-negative integer or "auto" (got {value!r})')
    return int(value)


def _enabled(path: str, section: Any, name: str) -> bool | None:
    if section is None:
        return False
    if not isinstance(section, dict):
        raise _error(path, f'"{name}" must be an object (got {section!r})')
    value = section.get("enabled", False)
    if value == AUTO:
        return None
    if not isinstance(value, bool):
        raise _error(path, f'"{name}.enabled" must be true, false or "auto" (got {value!r})')
    return value


def read_deepspeed_config(path: str) -> DeepSpeedRun:
    """Parse and check ``path``; every refusal is a one-line UsageError naming the key."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise _error(path, "a DeepSpeed config is a JSON object")
    _check_keys(path, config, "", PLANNED | NO_MEMORY_EFFECT, ONLY_AT)
    zero_section = config.get("zero_optimization", {})
    if not isinstance(zero_section, dict):
        raise _error(path, '"zero_optimization" must be an object')
    _check_keys(path, zero_section, "zero_optimization.", ZERO_PLANNED | ZERO_NO_MEMORY_EFFECT, ZERO_ONLY_AT)
    stage = zero_section.get("stage", 0)
    if stage not in (1, 2, 3):
        raise _error(path, f"zero_optimization.stage {stage!r}: dpplan plans DeepSpeed's stages 1, 2 and 3 "
                           "(stage 0 is data parallelism: plan --strategy ddp)")

    zero, hidden_auto = _zero_settings(path, zero_section, stage)
    precision, torch_autocast = _precision(path, config)
    zero = replace(zero, torch_autocast=torch_autocast, source=path, hidden_size_auto=hidden_auto)
    return DeepSpeedRun(
        path=path,
        strategy=f"zero{stage}",
        precision=precision,
        offload=_offload(path, zero_section, stage),
        optimizer=_optimizer(path, config.get("optimizer")),
        batch_size=_positive(path, "train_micro_batch_size_per_gpu", config.get("train_micro_batch_size_per_gpu", AUTO)),
        grad_accum=_positive(path, "gradient_accumulation_steps", config.get("gradient_accumulation_steps", AUTO)),
        train_batch_size=_positive(path, "train_batch_size", config.get("train_batch_size", AUTO)),
        zero=zero,
    )


def _check_keys(path: str, section: dict, prefix: str, known: set[str], only_at: dict) -> None:
    for key, value in section.items():
        if key in only_at:
            allowed, what = only_at[key]
            if value not in allowed:
                raise _error(path, f'{what} is not planned by dpplan ("{prefix}{key}": {value!r})')
        elif key not in known:
            raise _error(path, f'"{prefix}{key}" is not planned by dpplan (it plans ZeRO, precision, offload, '
                               "batch and accumulation); remove it to plan without it")


def _positive(path: str, key: str, value: Any) -> int | None:
    number = _number(path, key, value)
    if number == 0:
        raise _error(path, f"{key} must be >= 1")
    return number


def _zero_settings(path: str, section: dict, stage: int) -> tuple[ZeroSettings, tuple[str, ...]]:
    values: dict[str, Any] = {}
    hidden_auto = []
    names = {
        "reduce_bucket_size": "reduce_bucket_size",
        "allgather_bucket_size": "allgather_bucket_size",
        "stage3_prefetch_bucket_size": "prefetch_bucket_size",
        "stage3_max_live_parameters": "max_live_parameters",
        "stage3_max_reuse_distance": "max_reuse_distance",
        "stage3_param_persistence_threshold": "param_persistence_threshold",
        "sub_group_size": "sub_group_size",
    }
    for key, field_name in names.items():
        # DeepSpeed also takes the stage-3 names without their "stage3_" prefix (pydantic aliases).
        raw_key = key if key in section else key.removeprefix("stage3_")
        if raw_key not in section:
            continue
        value = section[raw_key]
        if value == AUTO:
            if key not in HIDDEN_SIZE_KEYS:
                raise _error(path, f'zero_optimization.{raw_key} cannot be "auto"')
            if key != "reduce_bucket_size" and stage != 3:
                continue  # the Trainer fills these at stage 3 only; below it DeepSpeed ignores them
            hidden_auto.append(field_name)
            continue
        number = _number(path, f"zero_optimization.{raw_key}", value)
        if field_name == "reduce_bucket_size" and number == 0:
            raise _error(path, "zero_optimization.reduce_bucket_size must be >= 1")
        values[field_name] = number
    overlap = section.get("overlap_comm")
    if overlap is not None and not isinstance(overlap, bool):
        raise _error(path, f"zero_optimization.overlap_comm must be true or false (got {overlap!r})")
    values["overlap_comm"] = overlap
    return ZeroSettings(**values), tuple(hidden_auto)


def _precision(path: str, config: dict) -> tuple[str | None, bool]:
    """(precision or None for "auto", torch_autocast)."""
    bf16 = _enabled(path, config.get("bf16"), "bf16")
    fp16 = _enabled(path, config.get("fp16"), "fp16")
    autocast_section = config.get("torch_autocast")
    autocast = _enabled(path, autocast_section, "torch_autocast")
    if isinstance(config.get("fp16"), dict) and config["fp16"].get("auto_cast"):
        raise _error(path, 'fp16.auto_cast is not planned by dpplan (use the "torch_autocast" section)')
    if autocast is None:
        raise _error(path, 'torch_autocast.enabled cannot be "auto" (HF\'s Trainer does not fill it)')
    if sum(bool(x) for x in (bf16, fp16, autocast)) > 1:
        raise _error(path, "enable at most one of bf16, fp16 and torch_autocast")
    if autocast:
        extra = set(autocast_section or {}) - {"enabled", "dtype"}
        if extra:
            raise _error(path, f"torch_autocast.{sorted(extra)[0]} is not planned by dpplan")
        dtype = (autocast_section or {}).get("dtype", "bfloat16")
        modes = {"bfloat16": "bf16-mixed", "torch.bfloat16": "bf16-mixed", "float16": "fp16-mixed",
                 "torch.float16": "fp16-mixed"}
        if dtype not in modes:
            raise _error(path, f"torch_autocast.dtype must be bfloat16 or float16 (got {dtype!r})")
        return modes[dtype], True
    if bf16:
        return "bf16-mixed", False
    if fp16:
        return "fp16-mixed", False
    if bf16 is None or fp16 is None:
        return None, False
    return "fp32", False


def _offload(path: str, section: dict, stage: int) -> str:
    def device(name: str) -> str:
        value = section.get(name)
        if value is None:
            return "none"
        if not isinstance(value, dict):
            raise _error(path, f"zero_optimization.{name} must be an object")
        extra = set(value) - {"device", "pin_memory", "buffer_count", "fast_init", "ratio"}
        if extra:
            raise _error(path, f"zero_optimization.{name}.{sorted(extra)[0]} is not planned by dpplan")
        where = value.get("device", "none")
        if where == "nvme":
            raise _error(path, f"zero_optimization.{name}: NVMe offload is not planned by dpplan")
        if where not in ("cpu", "none"):
            raise _error(path, f"zero_optimization.{name}.device must be cpu or none (got {where!r})")
        if value.get("ratio", 1.0) != 1.0:
            raise _error(path, f"zero_optimization.{name}.ratio (partial offload) is not planned by dpplan")
        return where

    optimizer, param = device("offload_optimizer"), device("offload_param")
    if param == "cpu" and stage != 3:
        raise _error(path, "zero_optimization.offload_param is a stage-3 option")
    if param == "cpu" and optimizer != "cpu":
        raise _error(path, "offload_param without offload_optimizer is not planned by dpplan")
    if optimizer == "cpu":
        return "optimizer+params" if param == "cpu" else "optimizer"
    return "none"


def _optimizer(path: str, section: Any) -> str | None:
    if section is None:
        return None
    if not isinstance(section, dict) or "type" not in section:
        raise _error(path, '"optimizer" must be an object with a "type"')
    name = str(section["type"]).lower()
    if name not in OPTIMIZER_TYPES:
        raise _error(path, f"optimizer type {section['type']!r} is not planned by dpplan (Adam, AdamW, SGD)")
    params = section.get("params", {})
    if name == "sgd" and isinstance(params, dict) and params.get("momentum", 0) not in (0, AUTO):
        return "sgd-momentum"
    return OPTIMIZER_TYPES[name]


def resolve_for_model(zero: ZeroSettings, model) -> ZeroSettings:
    """The hidden-size "auto" values, from the model's ``config`` as HF's Trainer reads it."""
    hidden_size_auto = zero.hidden_size_auto
    if not hidden_size_auto:
        return zero
    hidden = model_hidden_size(model)
    if hidden is None:
        raise UsageError(
            f"{zero.source}: the model has no config.hidden_size, so these \"auto\" values cannot be filled "
            f"(as in HF's Trainer): {', '.join(hidden_size_auto)}; give them as integers"
        )
    values: dict[str, Any] = {
        "reduce_bucket_size": hidden * hidden,
        "prefetch_bucket_size": int(0.9 * hidden * hidden),
        "param_persistence_threshold": 10 * hidden,
    }
    return replace(zero, hidden_size_auto=(), **{name: values[name] for name in hidden_size_auto})


def model_hidden_size(model) -> int | None:
    config = getattr(model, "config", None)
    for source in (config, getattr(config, "text_config", None)):
        if source is None:
            continue
        if isinstance(getattr(source, "hidden_size", None), int):
            return source.hidden_size
        sizes = getattr(source, "hidden_sizes", None)
        if sizes:
            return max(sizes)
    return None


def merge_with_flags(run: DeepSpeedRun, flags: dict[str, Any], given: set[str], gpus: tuple[int, ...]) -> dict[str, Any]:
    """The run's settings: the file's where it states them, the flags where it says "auto" or
    nothing. ``given`` names the flags typed on the command line; one that contradicts the file
    is an error. Returns strategies, precision, offload, optimizer, batch_size, grad_accum, zero."""
    def pick(flag: str, from_file: Any) -> Any:
        if from_file is None:
            return flags[flag]
        if flag in given and flags[flag] != from_file:
            raise _error(run.path, f"--{flag.replace('_', '-')} {flags[flag]} contradicts the file ({from_file})")
        return from_file

    if "strategies" in given and tuple(flags["strategies"]) != (run.strategy,):
        raise _error(run.path, f"--strategy {','.join(flags['strategies'])} contradicts the file's stage ({run.strategy})")
    precision = run.precision
    if precision == "bf16-mixed" and flags["precision"] == "bf16" and not run.zero.torch_autocast:
        precision = "bf16"  # the "bf16" section with a model already in bf16
    batch_size = pick("batch_size", run.batch_size)
    grad_accum = pick("grad_accum", run.grad_accum)
    if run.train_batch_size is not None:
        for world in gpus:
            if run.train_batch_size != batch_size * grad_accum * world:
                raise _error(run.path, f"train_batch_size {run.train_batch_size} != micro-batch {batch_size} x "
                                       f"accumulation {grad_accum} x {world} GPUs")
    return {
        "strategies": (run.strategy,),
        "precision": pick("precision", precision),
        "offload": pick("offload", run.offload),
        "optimizer": pick("optimizer", run.optimizer),
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "zero": run.zero,
    }
