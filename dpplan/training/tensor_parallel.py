"""Tensor and sequence parallelism: which plan a model gets, checked, and applied, the same
way by the tracer (on a fake process group) and by the real runs (profiler/parallelize.py).

A plan is exactly what torch's ``parallelize_module(model, tp_mesh, plan)`` takes: module
paths (``*`` matches one level, as torch allows) mapped to ``ParallelStyle`` objects. It comes
from, in order:
  1. the model file's ``tp_plan(model, sequence_parallel) -> dict[str, ParallelStyle]``;
  2. a Hugging Face model's own plan (``config.base_model_tp_plan``, the strings
     transformers uses: ``colwise``, ``rowwise``, ...), mapped to torch's styles
     (transformers/integrations/tensor_parallel.py names them; the mapping is below);
  3. a Megatron-style rule for standard attention and MLP blocks (Shoeybi et al., 2019,
     "Megatron-LM", section 3: the first linear of each pair split by columns, the second
     by rows, so one all-reduce per block in forward and one in backward), by the names the
     common model families give their projections.
With sequence parallelism (Korthikanti et al., 2022) the residual stream between blocks and
the norms on it run sequence-sharded (``SequenceParallel``), each attention and MLP block
gathers the sequence once on entry and its row-wise layer reduce-scatters on exit
(``Shard(1)`` out), as torchtitan's Llama plan does (torchtitan/models/llama3/infra/
parallelize.py ``apply_tp``). Parameters a plan leaves whole become replicated DTensors
(``apply_tensor_parallel``).

Imported only when a plan has tensor parallelism (it imports torch.distributed.tensor).

Ranks hold whole attention heads: every sharded projection's split dimension, and every head
count the model declares, must divide by the tensor-parallel degree (checked, one line each).
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from dpplan.errors import UsageError

COLWISE_NAMES = frozenset({
    "q", "k", "v", "q_proj", "k_proj", "v_proj", "qkv", "qkv_proj", "wq", "wk", "wv", "query", "key", "value",
    "gate", "up", "gate_proj", "up_proj", "w1", "w3", "fc", "fc1", "fc_in", "c_fc", "c_attn", "in_proj",
})
"""Last path atoms of the first linear of an attention or MLP block (split by output features)."""
ROWWISE_NAMES = frozenset({
    "o", "o_proj", "out_proj", "wo", "proj", "down", "down_proj", "w2", "fc2", "fc_out", "c_proj",
})
"""Last path atoms of the second linear (split by input features)."""
KEPT_WHOLE_STYLES = frozenset({"replicate", "gather", "local", "replicated_with_grad_allreduce"})
"""transformers' plan strings for modules every rank keeps whole (Qwen3's and Gemma 3's
per-head q/k norms: ``replicated_with_grad_allreduce``); dpplan replicates them."""
ATTENTION_NAMES = frozenset({
    "q", "k", "v", "o", "q_proj", "k_proj", "v_proj", "o_proj", "qkv", "qkv_proj", "wq", "wk", "wv", "wo",
    "query", "key", "value", "c_attn", "in_proj", "out_proj",
})
"""Attention projections, whose per-rank features must be whole heads (``head_dim``)."""
NORM_NAMES = ("norm", "ln", "layernorm", "layer_norm", "rmsnorm")
"""Substrings of a norm's class or attribute name (sequence parallelism shards norms)."""
HEAD_ATTRIBUTES = ("num_heads", "n_heads", "num_attention_heads", "n_head", "num_key_value_heads", "n_kv_heads",
                   "num_kv_heads", "n_kv_head")
"""Attributes through which a model or its config declares head counts."""



class TensorParallelError(UsageError):
    """The model cannot be split as asked (one line, exit 2)."""


def tensor_parallel_plan(model: nn.Module, tp: int, sequence_parallel: bool,
                         user_plan: Callable[[nn.Module, bool], dict] | None = None) -> dict[str, Any]:
    """The plan ``parallelize_module`` gets for ``model`` at degree ``tp`` (see module docstring),
    checked for divisibility."""
    if user_plan is not None:
        plan = user_plan(model, sequence_parallel)
        if not isinstance(plan, dict) or not plan:
            raise TensorParallelError("tp_plan(model, sequence_parallel) must return a non-empty dict "
                                      "{module path: ParallelStyle}")
        source = "tp_plan"
    else:
        split = hugging_face_split(model)
        source = "the model's base_model_tp_plan"
        if split is None:
            split = megatron_rule_split(model)
            source = "dpplan's Megatron-style rule"
        plan = styles_for(model, split, sequence_parallel)
    check_divisible(model, plan, tp, source)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh, plan: dict[str, Any]) -> None:
    """Shard ``model`` in place over ``tp_mesh`` (a 1-D DeviceMesh): torch's own
    ``parallelize_module``, as a user's script calls it; then every module whose own
    parameters the plan left plain keeps them whole as replicated DTensors. Left plain, they
    would sit beside DTensors in one optimizer step, and torch's foreach kernels (the default
    on GPUs) refuse mixed lists ("got mixed torch.Tensor and DTensor"), which is why
    torchtitan keeps such modules whole with its ``NoParallel`` style
    (torchtitan/distributed/tensor_parallel.py)."""
    parallelize_module(model, tp_mesh, plan)
    for module in list(model.modules()):
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            parallelize_module(module, tp_mesh, ReplicateParameters())


@dataclass(frozen=True)
class Split:
    """Which modules a plan splits, by path (before they get torch's styles)."""

    colwise: tuple[str, ...]
    rowwise: tuple[str, ...]
    embedding: str | None = None
    """The token embedding, split by vocabulary rows."""
    head: str | None = None
    """The output head, split by output features, its logits gathered whole on every rank."""
    norms: tuple[str, ...] = ()
    """Norms the model's own plan runs sequence-parallel (else found by name)."""


# -- where a plan comes from --------------------------------------------------------------------
def hugging_face_split(model: nn.Module) -> Split | None:
    """A transformers model's own plan (``config.base_model_tp_plan``, relative to the base
    model, which a task model holds under ``base_model_prefix``, and the task class's
    ``_tp_plan`` for its head), read as column- or row-wise splits; None: not a Hugging Face
    model, or one without a plan. transformers' strings name the same two splits with
    variants of how outputs are kept (``colwise_gather_output``, ``packed_colwise``, ...)."""
    config = getattr(model, "config", None)
    base_plan = getattr(config, "base_model_tp_plan", None)
    if not base_plan:
        return None
    prefix = getattr(model, "base_model_prefix", "")
    inner = prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""
    strings = {f"{inner}.{path}" if inner else path: style for path, style in base_plan.items()}
    strings.update(getattr(model, "_tp_plan", None) or getattr(type(model), "_tp_plan", None) or {})
    modules = dict(model.named_modules())
    colwise, rowwise, norms = [], [], []
    embedding = head = None
    for pattern, style in strings.items():
        for path in _expand(pattern, modules):
            module = modules[path]
            if "colwise" in style and isinstance(module, nn.Linear) and path.count(".") == 0:
                head = path
            elif "rowwise" in style and isinstance(module, nn.Embedding):
                embedding = path
            elif "colwise" in style:
                colwise.append(path)
            elif "rowwise" in style:
                rowwise.append(path)
            elif style == "sequence_parallel":
                norms.append(path)
            elif style not in KEPT_WHOLE_STYLES:
                raise TensorParallelError(
                    f"{path}: the model's tensor-parallel plan uses {style!r}, which dpplan does not map "
                    "(column- and row-wise splits and sequence_parallel); define tp_plan(model, sequence_parallel)"
                )
    if head is None:
        head = _output_head(model)
    return Split(tuple(colwise), tuple(rowwise), embedding, head, tuple(norms))


def megatron_rule_split(model: nn.Module) -> Split:
    """Column-wise the first, row-wise the second linear of every attention and MLP block the
    names say (``COLWISE_NAMES`` / ``ROWWISE_NAMES``); the token embedding and output head."""
    colwise, rowwise = [], []
    embedding = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Embedding) and embedding is None and path.count(".") <= 1:
            embedding = path
        if not isinstance(module, nn.Linear) or "." not in path:
            continue
        atom = path.rsplit(".", 1)[1]
        if atom in COLWISE_NAMES:
            colwise.append(path)
        elif atom in ROWWISE_NAMES:
            rowwise.append(path)
    if not colwise or not rowwise:
        raise TensorParallelError(
            f"{type(model).__name__}: no attention or MLP projections dpplan's tensor-parallel rule knows "
            f"(linear layers named e.g. q_proj/o_proj, fc1/fc2); define tp_plan(model, sequence_parallel) "
            f"in the model file, the plan torch's parallelize_module takes"
        )
    return Split(tuple(colwise), tuple(rowwise), embedding, _output_head(model))


def styles_for(model: nn.Module, split: Split, sequence_parallel: bool) -> dict[str, Any]:
    """torch's styles for a split, as torchtitan's ``apply_tp`` gives them: the embedding split
    by vocabulary (``RowwiseParallel``), the head by output features with its logits replicated
    (no loss parallelism), the blocks column- then row-wise. With sequence parallelism the
    residual stream between blocks stays sequence-sharded: the norms run on their shard
    (``SequenceParallel``), each attention and MLP block gathers its input once on entry
    (torchtitan's ``PrepareModuleInput`` on ``attention`` and ``feed_forward``) and its row-wise
    layer reduce-scatters on exit; the stream is scattered on entry to the first block and the
    head gathers it."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, Any] = {}
    if split.embedding is not None:
        plan[split.embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    for path in split.colwise:
        plan[path] = ColwiseParallel()
    for path in split.rowwise:
        plan[path] = RowwiseParallel(output_layouts=seq)
    if split.head is not None and split.head not in plan:
        plan[split.head] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    if sequence_parallel:
        # the stream is split on entry to the first block, not at the embedding: positions
        # (learned embeddings, Hugging Face's rotary tables) are computed from the whole sequence
        blocks = _block_paths(model)
        gathered = sorted({p.rsplit(".", 1)[0] for p in split.colwise})
        if blocks and set(gathered) & set(blocks):
            raise TensorParallelError(
                f"sequence parallelism gathers the sequence on entry to each attention and MLP module, but "
                f"{gathered[0]} ({type(model).__name__}) holds its projections directly; define "
                "tp_plan(model, sequence_parallel) for it"
            )
        if blocks:
            plan.setdefault(blocks[0], ScatterSequence())
        for block, child, splits in _sub_blocks(model, blocks, split):
            # a sub-block that ends in no row-wise layer (a mixture of experts kept whole)
            # leaves the whole sequence: it cuts its output back to this rank's piece
            plan[f"{block}.{child}"] = GatherSequence(scatter_output=not splits)
        for path in split.norms or _norms(model, blocks, set(plan)):
            plan[path] = SequenceParallel(use_local_output=True)
    return plan


def _block_paths(model: nn.Module) -> list[str]:
    """The model's repeated blocks (training/units.py's units), by path, in order."""
    from dpplan.training.units import find_units

    names = {id(m): p for p, m in model.named_modules()}
    return [names[id(u)] for u in find_units(model)]


def _sub_blocks(model: nn.Module, blocks: list[str], split: Split) -> list[tuple[str, str, bool]]:
    """(block, child, whether a row-wise layer ends it) for each child of each block that holds
    parameters and is not a norm: the attention and MLP (or experts) modules that read the
    normed residual stream."""
    modules = dict(model.named_modules())
    found = []
    for block in blocks:
        for child, module in modules[block].named_children():
            if _is_norm(child, module) or next(module.parameters(), None) is None:
                continue
            prefix = f"{block}.{child}."
            found.append((block, child, any(p.startswith(prefix) for p in split.rowwise)))
    return found


def _is_norm(name: str, module: nn.Module) -> bool:
    label = (name + type(module).__name__).lower()
    return any(n in label for n in NORM_NAMES) and not list(module.children())


def _norms(model: nn.Module, blocks: list[str], taken: set[str]) -> list[str]:
    """The norms on the residual stream: each block's own (its direct children named like
    norms) and those outside every block (the final norm); never one inside attention (a
    query/key norm sees the gathered sequence)."""
    found = []
    for path, module in model.named_modules():
        if not path or path in taken or not _is_norm(path.rsplit(".", 1)[-1], module):
            continue
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        inside = [b for b in blocks if path.startswith(b + ".")]
        if not inside or parent in blocks:
            found.append(path)
    return found


def _output_head(model: nn.Module) -> str | None:
    """The last top-level linear (the LM head), if the model has one."""
    last = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and "." not in path:
            last = path
    return last


def _expand(pattern: str, modules: dict[str, nn.Module]) -> list[str]:
    """Module paths a plan key names (``*`` matches one path atom, as in parallelize_module)."""
    if "*" not in pattern:
        return [pattern] if pattern in modules else []
    atoms = pattern.split(".")
    return [p for p in modules if len(p.split(".")) == len(atoms)
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p.split("."), atoms))]


def _to_sequence(tensor, device_mesh, placement):
    """The sequence-sharded (``Shard(1)``) local tensor ``tensor`` as ``placement``, local."""
    if not isinstance(tensor, DTensor):
        tensor = DTensor.from_local(tensor, device_mesh, (Shard(1),), run_check=False)
    return tensor.redistribute(device_mesh, (placement,)).to_local()


def _first_tensor_hook(convert):
    """A forward pre-hook that converts a module's first tensor input (positional or keyword)."""

    def pre_hook(_module, args, kwargs):
        if args and torch.is_tensor(args[0]):
            return (convert(args[0]), *args[1:]), kwargs
        for key, value in kwargs.items():
            if torch.is_tensor(value):
                return args, {**kwargs, key: convert(value)}
        return args, kwargs

    return pre_hook


class ScatterSequence(ParallelStyle):
    """The first block under sequence parallelism: its input, the whole sequence on every rank,
    is cut to this rank's ``Shard(1)`` piece (no communication: DTensor's Replicate -> Shard
    is a local slice)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def scatter(tensor):
            if isinstance(tensor, DTensor):
                return tensor.redistribute(device_mesh, (Shard(1),)).to_local()
            whole = DTensor.from_local(tensor, device_mesh, (Replicate(),), run_check=False)
            return whole.redistribute(device_mesh, (Shard(1),)).to_local()

        module.register_forward_pre_hook(_first_tensor_hook(scatter), with_kwargs=True)
        return module


class ReplicateParameters(ParallelStyle):
    """A module kept whole on every rank of the group: its own parameters become replicated
    DTensors (no copy: the local tensor is the whole parameter), and while its forward runs it
    sees their local tensors (``to_local()``, a view whose gradient returns to the DTensor
    replicated), so that it computes on plain tensors exactly as before, whatever ops it uses."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        names = []
        for name, param in list(module.named_parameters(recurse=False)):
            whole = distribute_tensor(param.detach(), device_mesh, (Replicate(),))
            module.register_parameter(name, nn.Parameter(whole, requires_grad=param.requires_grad))
            names.append(name)
        replicated: dict[str, nn.Parameter] = {}
        """The parameters while the forward runs (read then, not now: a model moved to another
        device, or to the planner's fake device, has new parameter objects)."""

        def use_local(_module, _args):
            for name in names:
                current = getattr(module, name)
                if isinstance(current, DTensor):  # (DDP's TP hooks may have made it a plain attribute)
                    replicated[name] = current
                    _set_tensor(module, name, current.to_local())

        def restore(_module, _args, _output):
            for name, param in replicated.items():
                _set_tensor(module, name, param)
            replicated.clear()

        module.register_forward_pre_hook(use_local)
        module.register_forward_hook(restore, always_call=True)
        return module


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` where ``module`` keeps ``name``: its parameters, or its attributes (DDP's
    ``_pre_dp_module_transform`` puts rebuilt DTensors there during the forward)."""
    if name in module._parameters:
        module._parameters[name] = value  # type: ignore[assignment]  # for the forward only
    else:
        module.__dict__[name] = value


class GatherSequence(ParallelStyle):
    """A style for an attention or MLP block under sequence parallelism: its first input (the
    sequence-sharded residual stream, positional or the first tensor keyword) is all-gathered
    to the whole sequence once, as torch's ``PrepareModuleInput(Shard(1) -> Replicate)`` does
    for a positional input; Hugging Face layers pass ``hidden_states=`` by keyword, which
    ``PrepareModuleInput`` would need named in advance. ``scatter_output``: the block's output
    (the whole sequence, no row-wise layer reduced it) is cut back to this rank's piece."""

    def __init__(self, *, scatter_output: bool = False):
        super().__init__()
        self.scatter_output = scatter_output

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        gather = functools.partial(_to_sequence, device_mesh=device_mesh, placement=Replicate())
        module.register_forward_pre_hook(_first_tensor_hook(gather), with_kwargs=True)
        if self.scatter_output:
            def scatter(_module, _args, output):
                def cut(tensor):
                    whole = DTensor.from_local(tensor, device_mesh, (Replicate(),), run_check=False)
                    return whole.redistribute(device_mesh, (Shard(1),)).to_local()

                if torch.is_tensor(output):
                    return cut(output)
                if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
                    return (cut(output[0]), *output[1:])
                return output

            module.register_forward_hook(scatter)
        return module


# -- checks ---------------------------------------------------------------------------------
def check_divisible(model: nn.Module, plan: dict[str, Any], tp: int, source: str) -> None:
    """Every head count the model declares, and every split dimension of a sharded linear or
    embedding, divides by ``tp``: each rank holds whole heads and equal shards."""
    counts = _head_counts(model)
    for where, name, count in counts:
        if count % tp:
            raise TensorParallelError(f"tp={tp} does not divide {where}{name}={count}: each rank must hold whole heads")
    matched = 0
    exact = {p: s for p, s in plan.items() if "*" not in p}
    patterns = [(p, s) for p, s in plan.items() if "*" in p]
    for path, module in model.named_modules():
        style = exact.get(path)
        if style is None:
            style = next((s for p, s in patterns if fnmatch.fnmatchcase(path, p)), None)
        if style is None:
            continue
        matched += 1
        if isinstance(module, nn.Linear):
            size, what = ((module.out_features, "output features") if isinstance(style, ColwiseParallel)
                          else (module.in_features, "input features") if isinstance(style, RowwiseParallel)
                          else (0, ""))
            if size % tp:
                raise TensorParallelError(f"tp={tp} does not divide the {size} {what} of {path} ({source})")
            head_dim = _head_dim_of(model, path) if path.rsplit(".", 1)[-1] in ATTENTION_NAMES else None
            if size and head_dim and (size // tp) % head_dim:
                raise TensorParallelError(
                    f"tp={tp} leaves {path} {size // tp} {what} per rank, not whole heads of {head_dim} "
                    f"({size // head_dim} heads over {tp} ranks)"
                )
        elif isinstance(module, nn.Embedding) and isinstance(style, (ColwiseParallel, RowwiseParallel)):
            size = module.num_embeddings if isinstance(style, RowwiseParallel) else module.embedding_dim
            if size % tp:
                raise TensorParallelError(f"tp={tp} does not divide the {size}-row embedding {path} ({source})")
    if not matched:
        raise TensorParallelError(f"the tensor-parallel plan ({source}) names no module of the model: "
                                  f"{', '.join(list(plan)[:4])}")


def _head_dim_of(model: nn.Module, path: str) -> int | None:
    """``head_dim`` of the module holding the linear at ``path`` (attention modules declare it),
    None when it declares none."""
    if "." not in path:
        return None
    value = model.get_submodule(path.rsplit(".", 1)[0]).__dict__.get("head_dim")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _head_counts(model: nn.Module) -> list[tuple[str, str, int]]:
    """(where, attribute, count) for every integer head count on the model's config or modules."""
    found = []
    config = getattr(model, "config", None)
    for name in HEAD_ATTRIBUTES:
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            found.append(("the config's ", name, value))
    seen = {name for _, name, _ in found}
    for path, module in model.named_modules():
        for name in HEAD_ATTRIBUTES:
            if name in seen:
                continue
            value = module.__dict__.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found.append((f"{path or type(model).__name__}.", name, value))
                seen.add(name)
    return found
