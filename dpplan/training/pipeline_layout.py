"""Which pipeline stages a rank holds and how a model's layers split into them: the numbers of
a pipeline, without torch (the config checks them before anything is traced or launched;
training/pipeline_parallel.py builds the stages and runs them)."""

from __future__ import annotations

from dataclasses import dataclass

from dpplan.errors import UsageError

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble", "zbv")
"""``--pp-schedule`` values, in torch's names: ScheduleGPipe, Schedule1F1B,
ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble."""
SPLIT_BACKWARD_SCHEDULES = ("zero-bubble", "zbv")
"""Schedules whose backward is two steps: input gradients, later weight gradients (Qi et al.,
"Zero Bubble Pipeline Parallelism", ICLR 2024)."""
VIRTUAL_STAGES = 2
"""Stages per rank of the multi-stage schedules (torchtitan's default for them)."""


class PipelineError(UsageError):
    """A model or setting pipeline parallelism cannot take, as one line (exit 2)."""


@dataclass(frozen=True, kw_only=True)
class PipelineLayout:
    """``pp`` ranks running ``schedule`` over ``num_micro_batches`` micro-batches per step."""

    pp: int
    schedule: str = "1f1b"
    num_micro_batches: int = 1

    @property
    def stages_per_rank(self) -> int:
        return 1 if self.schedule in ("gpipe", "1f1b") else VIRTUAL_STAGES

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """Stage indices rank ``rank`` holds, in the order its schedule lists them."""
        if self.stages_per_rank == 1:
            return (rank,)
        if self.schedule == "zbv":
            return (rank, 2 * self.pp - 1 - rank)
        return tuple(rank + v * self.pp for v in range(self.stages_per_rank))


def check_layout(layout: PipelineLayout) -> None:
    """One line for a schedule torch cannot run with these numbers (checked before tracing)."""
    if layout.schedule not in SCHEDULES:
        raise PipelineError(f"unknown --pp-schedule {layout.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    m, pp = layout.num_micro_batches, layout.pp
    if layout.schedule in ("interleaved-1f1b", "zero-bubble") and m % pp:
        # torch's looped schedules run micro-batches in rounds of pp
        raise PipelineError(f"--pp-schedule {layout.schedule} needs --grad-accum (micro-batches) divisible by "
                            f"--pp {pp}; got {m}")
    if layout.schedule != "gpipe" and m < pp:
        raise PipelineError(f"--pp-schedule {layout.schedule} needs at least --pp ({pp}) micro-batches per step "
                            f"(--grad-accum); got {m}")


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Layer indices of each stage: even, in order, the first ``num_layers % num_stages``
    stages one layer more."""
    if num_layers < num_stages:
        raise PipelineError(f"{num_stages} pipeline stages need at least {num_stages} layers; the model has "
                            f"{num_layers}")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges
