"""ZeroSettings: the DeepSpeed ZeRO settings a zero1/zero2/zero3 plan depends on, with DeepSpeed's
defaults (deepspeed/runtime/zero/config.py ``DeepSpeedZeroConfig``, DeepSpeed 0.19).

The defaults are what ``--strategy zeroN`` plans; ``--deepspeed-config`` sets them from a user's
file (planner/deepspeed_config.py). Sizes are in elements, as DeepSpeed counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

REDUCE_BUCKET_NUMEL = 500_000_000  # reduce_bucket_size
ALLGATHER_BUCKET_NUMEL = 500_000_000  # allgather_bucket_size
PREFETCH_BUCKET_NUMEL = 50_000_000  # stage3_prefetch_bucket_size
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters
MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance
PARAM_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold
SUB_GROUP_NUMEL = 1_000_000_000  # sub_group_size


@dataclass(frozen=True, kw_only=True)
class ZeroSettings:
    """What DeepSpeed is told beyond the stage, precision and offload (which every strategy has)."""

    reduce_bucket_size: int = REDUCE_BUCKET_NUMEL
    allgather_bucket_size: int = ALLGATHER_BUCKET_NUMEL
    overlap_comm: bool | None = None
    """None: DeepSpeed's default, True at stage 3 only (``overlap_comm_valid``)."""
    prefetch_bucket_size: int = PREFETCH_BUCKET_NUMEL
    max_live_parameters: int = MAX_LIVE_PARAMETERS
    max_reuse_distance: int = MAX_REUSE_DISTANCE
    param_persistence_threshold: int = PARAM_PERSISTENCE_THRESHOLD
    sub_group_size: int = SUB_GROUP_NUMEL
    torch_autocast: bool = False
    """DeepSpeed's ``torch_autocast`` section instead of ``bf16`` / ``fp16`` (with bf16-mixed or
    fp16-mixed): fp32 parameters under torch.autocast, Linear/Conv gradients reduced in 16 bits."""
    source: str | None = None
    """The --deepspeed-config file these came from (None: DeepSpeed's defaults)."""
    hidden_size_auto: tuple[str, ...] = ()
    """Fields the file left "auto", filled from the model's hidden size once it is built
    (planner/deepspeed_config.py ``resolve_for_model``)."""

    def overlaps_comm(self, stage: int) -> bool:
        return stage == 3 if self.overlap_comm is None else self.overlap_comm

    def is_default(self) -> bool:
        return self == ZeroSettings()


DEFAULT_ZERO = ZeroSettings()
