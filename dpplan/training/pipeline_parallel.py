"""Pipeline parallelism: how a model is cut into stages, which stages a rank holds, and the
step a rank runs, the same way for the tracer (one rank on a fake process group) and for real
runs (profiler/pipeline_run.py). The schedules are torch's own
(``torch.distributed.pipelining``), so the plan sees what they keep: every in-flight
micro-batch's saved activations, the receive buffers a stage allocates once for all
micro-batches, the input gradients it sends back.

A stage comes from, in order:
  1. the model file's ``pipeline_stage(model, stage_index, num_stages) -> nn.Module``, whose
     forward takes one tensor (stage 0: the input ids; the others: the hidden states) and
     returns one (the last stage: the logits), with ``pipeline_loss(logits, labels)``;
  2. a Hugging Face decoder (``model.model.layers`` beside ``embed_tokens``, ``norm``,
     ``rotary_emb`` and ``model.lm_head``: Llama, Mistral, Qwen, Mixtral, OLMoE, ...), which
     dpplan cuts itself, with the causal-LM loss;
  3. nothing else: a clear error says to define the hooks.
Decoder layers are split evenly in order (the first ``layers % stages`` stages get one more);
stage 0 also owns the embedding, the last stage the final norm and the head.

Micro-batches: ``--grad-accum M`` micro-batches of ``--batch-size`` samples per step; the
schedule splits the step's M x b samples itself (``tensor_split``: views, no copy).
Virtual stages: the looped schedules (interleaved 1F1B, interleaved zero bubble) hold
stages ``r`` and ``r + pp`` on rank ``r``; ZBV holds ``r`` and ``2 pp - 1 - r`` (the V).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpplan.training.pipeline_layout import PipelineError, PipelineLayout, split_layers

__all__ = ["DecoderStage", "PipelineError", "PipelineLayout", "boundary_shapes", "build_schedule", "causal_lm_loss",
           "pipeline_batch", "run_pipeline_step", "split_layers", "stage_loss", "stage_module", "stage_units"]

IGNORE_INDEX = -100
"""Label ignored by the causal-LM loss (transformers' ``ForCausalLMLoss`` default)."""


# -- Hugging Face decoders --------------------------------------------------------------------

def _decoder_parts(model: nn.Module) -> tuple[Any, Any] | None:  # (model.model, lm_head): duck-typed
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if inner is None or head is None:
        return None
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(inner, name) for name in needed) or not isinstance(inner.layers, nn.ModuleList):
        return None
    return inner, head


def is_hf_decoder(model: nn.Module) -> bool:
    return _decoder_parts(model) is not None


class DecoderStage(nn.Module):
    """Stage ``stage_index`` of a Hugging Face decoder: the embedding on the first, its slice of
    ``layers`` (a ModuleList, so that its layers are the stage's units; ``layer_indices`` are
    their indices in the model), the final norm and head on the last. Rotary
    embeddings (no parameters) run on every stage. Attention is causal through the attention
    implementation's own mask (``attention_mask=None``: sdpa's ``is_causal``)."""

    def __init__(self, model: nn.Module, stage_index: int, num_stages: int):
        super().__init__()
        parts = _decoder_parts(model)
        assert parts is not None, "stage_module cuts only what is_hf_decoder accepts"
        inner, head = parts
        layers = split_layers(len(inner.layers), num_stages)[stage_index]
        self.first, self.last = stage_index == 0, stage_index == num_stages - 1
        self.embed_tokens = inner.embed_tokens if self.first else None
        self.layer_indices = tuple(layers)
        self.layers = nn.ModuleList(inner.layers[i] for i in layers)
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if self.last else None
        self.lm_head = head if self.last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, positions)
        for layer in self.layers:
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.norm is not None and self.lm_head is not None:
            hidden = self.lm_head(self.norm(hidden))
        return hidden


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss as transformers computes it (``loss/loss_utils.py``,
    ``ForCausalLMLoss``: float logits, labels padded by one ignored position and shifted)."""
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


# -- stages from a model spec ------------------------------------------------------------------

def stage_module(spec: Any, model: nn.Module, stage_index: int, num_stages: int) -> nn.Module:
    """Stage ``stage_index`` of ``num_stages`` of ``model`` (it shares the model's modules)."""
    hook = getattr(spec, "pipeline_stage", None)
    if hook is not None:
        stage = hook(model, stage_index, num_stages)
        if not isinstance(stage, nn.Module):
            raise PipelineError(f"{spec.name}: pipeline_stage() returned {type(stage).__name__}, not an nn.Module")
        return stage
    if is_hf_decoder(model):
        return DecoderStage(model, stage_index, num_stages)
    raise PipelineError(
        f"{spec.name}: --pp needs the model cut into stages: define pipeline_stage(model, stage_index, num_stages) "
        "and pipeline_loss(logits, labels) in the model file (dpplan cuts Hugging Face decoders itself)"
    )


def stage_units(stage: nn.Module, wrap_class: str | None = None) -> list[nn.Module]:
    """The checkpointing (and FSDP) units of a stage, by training/units.py's rule on the stage
    alone (a cut decoder's layers: its ModuleList), the same for the trace and real runs."""
    from dpplan.training.units import find_units

    return find_units(stage, wrap_class)


def stage_loss(spec: Any, model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    hook = getattr(spec, "pipeline_loss", None)
    if hook is not None:
        return hook
    if is_hf_decoder(model):
        return causal_lm_loss
    raise PipelineError(f"{spec.name}: --pp needs pipeline_loss(logits, labels) in the model file")


def pipeline_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(stage-0 input, last-stage target) of an example batch: ``input_ids`` and ``labels`` of a
    dict, or the two tensors of a pair."""
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        labels = batch.get("labels")
        return batch["input_ids"], labels if isinstance(labels, torch.Tensor) else batch["input_ids"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
        return batch[0], batch[1]
    raise PipelineError("--pp needs example_batch() to return {'input_ids': ..., 'labels': ...} or (inputs, labels)")


def boundary_shapes(stages: list[nn.Module], micro_input: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every stage for one micro-batch, as meta tensors: the static
    metadata ``PipelineStage`` takes, so no rank infers shapes by sending them. A cut Hugging
    Face decoder's are known without running it (hidden states of the embedding's width and
    dtype, then the head's logits): an MoE layer's routing cannot run on meta."""
    shapes: list[tuple[torch.Tensor, torch.Tensor]] = []
    x = micro_input.to("meta")
    if stages and all(isinstance(stage, DecoderStage) for stage in stages):
        embedding: Any = stages[0].embed_tokens
        head: Any = stages[-1].lm_head
        hidden = torch.empty((*x.shape, embedding.embedding_dim), dtype=embedding.weight.dtype, device="meta")
        logits = torch.empty((*x.shape, head.out_features), dtype=head.weight.dtype, device="meta")
        edges = [x] + [hidden] * (len(stages) - 1) + [logits]
        return list(zip(edges[:-1], edges[1:]))
    with torch.no_grad():
        for stage in stages:
            out = stage(x)
            if not isinstance(out, torch.Tensor):
                raise PipelineError(f"a pipeline stage must return one tensor; stage {len(shapes)} returned "
                                    f"{type(out).__name__}")
            shapes.append((x, out))
            x = out
    return shapes


def build_schedule(
    stage_modules: list[nn.Module], stage_indices: tuple[int, ...], layout: PipelineLayout,
    shapes: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: Callable, device: torch.device,
    group: Any = None,
) -> Any:
    """torch's schedule over this rank's ``PipelineStage`` objects, with static metadata (the
    shapes of ``boundary_shapes`` made on ``device``)."""
    from torch.distributed import pipelining as pipe

    def like(meta: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        return torch.empty(meta.shape, dtype=meta.dtype, device=device).requires_grad_(requires_grad)

    last = layout.num_stages - 1
    stages: list[Any] = []  # PipelineStage; the schedules type theirs as the private base class
    for module, index in zip(stage_modules, stage_indices):
        x, out = shapes[index]
        floating = x.is_floating_point()
        # requires_grad is part of the metadata: a received activation needs it for its gradient
        # to be sent back
        stages.append(pipe.PipelineStage(
            module, index, layout.num_stages, device,
            input_args=like(x, index > 0 and floating),
            output_args=like(out, True),
            output_grads=None if index == last else like(out, False),
            input_grads=like(x, False) if index > 0 and floating else None,
            group=group,
        ))
    n = layout.num_micro_batches
    if layout.schedule == "gpipe":
        return pipe.ScheduleGPipe(stages[0], n, loss_fn=loss_fn)
    if layout.schedule == "1f1b":
        return pipe.Schedule1F1B(stages[0], n, loss_fn=loss_fn)
    if layout.schedule == "interleaved-1f1b":
        return pipe.ScheduleInterleaved1F1B(stages, n, loss_fn=loss_fn)
    if layout.schedule == "zero-bubble":
        return pipe.ScheduleInterleavedZeroBubble(stages, n, loss_fn=loss_fn)
    return pipe.ScheduleZBVZeroBubble(stages, n, loss_fn=loss_fn)


SCHEDULE_CLASSES = {
    "gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "zero-bubble": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble",
}


def in_flight_micro_batches(layout: PipelineLayout) -> list[int]:
    """Per pipeline rank, the most micro-batches whose activations it holds at once, from the
    schedule's own action lists (torch/distributed/pipelining/_schedule_visualizer.py
    ``get_schedule_ops``): a forward adds one, its backward (full, or the zero-bubble schedules'
    input-gradient step, after which only the weight-gradient inputs wait for W) removes one.
    Ranks holding two stages count each stage's micro-batches."""
    from torch.distributed import pipelining
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    from torch.distributed.pipelining.schedules import _ComputationType as Kind

    schedule_class = getattr(pipelining, SCHEDULE_CLASSES[layout.schedule])
    ops = get_schedule_ops(schedule_class, layout.pp, layout.num_micro_batches,
                           num_stages_per_rank=layout.stages_per_rank)
    result = []
    for actions in ops:
        held = most = 0
        for action in actions:
            if action is None:
                continue
            kind = action.computation_type
            if kind == Kind.FORWARD:
                held += 1
                most = max(most, held)
            elif kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT):
                held -= 1
        result.append(most)
    return result


def run_pipeline_step(
    schedule: Any, layout: PipelineLayout, stage_indices: tuple[int, ...], inputs: torch.Tensor,
    target: torch.Tensor, *, autocast: contextlib.AbstractContextManager,
) -> None:
    """The forward and backward of one step of this rank's stages: the schedule runs every
    micro-batch (the first stage gets the inputs, the last the target; losses are averaged over
    micro-batches by the schedule's gradient scaling). The optimizer step follows, as in
    training/training_step.py."""
    last = layout.num_stages - 1
    kwargs: dict[str, Any] = {"return_outputs": False}
    if last in stage_indices:
        kwargs["target"] = target
        kwargs["losses"] = []
    args = (inputs,) if 0 in stage_indices else ()
    with autocast:
        schedule.step(*args, **kwargs)
