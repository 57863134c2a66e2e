"""A model by name instead of a model file: a Hugging Face config (``org/name`` on the Hub, a
``config.json``, a model directory), ``timm:NAME`` or ``torchvision:NAME``, turned into the
``ModelSpec`` a model file gives (training/model_file.py).

Hugging Face models are built with random weights from their config alone, the class named
first in ``config.architectures`` (the task head the checkpoint was saved with), else the first
training head transformers has for the ``model_type`` (seq2seq LM, masked LM, causal LM, image
classification, CTC, speech seq2seq), else the bare model. The planner builds them under
``torch.device("meta")``, so nothing the size of the weights is allocated. The example batch
follows the class's ``main_input_name`` (token ids, images, log-mel frames or a waveform), with
the labels its head trains on, so that ``output.loss`` is the head's own loss.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

from dpplan.training.hub_config import HF_EXTRA, find_config
from dpplan.training.model_file import MAX_MESSAGE_CHARS, ModelFileError, ModelSpec, split_model_argument

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "torchvision:"

MAX_DEFAULT_SEQ_LEN = 2048
"""Without --seq-len, token sequences are the largest power of two up to this and the config's
position limit: 2048 is GPT-3's and Llama 1's training context (Brown et al. 2020; Touvron et
al. 2023), a common fine-tuning length. The power of two keeps RoBERTa's 514 learned positions
(512 tokens + padding offset) in range."""
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_target_positions", "max_sequence_length")
"""Config attributes that bound a token sequence, in the order transformers' configs use them."""

IMAGENET_IMAGE_SIZE = 224
"""Image side where a config names none (ResNet, ConvNeXt, RegNet configs): the ImageNet training
crop of torchvision's classification reference (references/classification/train.py) and timm's
default ``input_size``."""
IMAGE_CHANNELS = 3
WAVEFORM_SAMPLES = 16_000
"""One second of 16 kHz audio, the sampling rate wav2vec 2.0 and HuBERT are trained on."""
CTC_LABEL_LEN = 16
"""Characters of a CTC transcript for one second of read speech (LibriSpeech: about 15 per second)."""

FALLBACK_HEADS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                  "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                  "MODEL_FOR_CTC_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_MAPPING_NAMES")
"""transformers' auto-class tables (model_type -> class name), tried in this order when
``config.architectures`` names no class transformers has; the last is the bare model. Encoders
(BERT, RoBERTa) also have a causal-LM head and encoder-decoders (BART) a decoder-only one: the
head they are pretrained with comes first."""


class Labels(StrEnum):
    """What a Hugging Face head trains on, read off its class name and ``forward``."""

    NONE = "none"
    """No ``labels`` argument (a bare model): the loss is the mean of its first output."""
    TOKENS = "tokens"
    """Language modelling (causal, masked, seq2seq): a label per token."""
    CLASSES = "classes"
    """One class per sample (sequence, image and audio classification)."""
    TOKEN_CLASSES = "token_classes"
    CTC = "ctc"


def is_model_name(model: str | None) -> bool:
    """Whether MODEL names a model rather than a ``.py`` model file (None: the bundled model)."""
    return bool(model) and split_model_argument(model)[0].suffix != ".py"


def load_model_by_name(model: str) -> ModelSpec:
    """The ModelSpec of ``model`` (a Hub id, config.json, model directory, timm:NAME or
    torchvision:NAME); raises ModelFileError with one line."""
    if model.startswith(TIMM_PREFIX):
        return _image_classifier_spec(model, *_timm_model(model.removeprefix(TIMM_PREFIX)))
    if model.startswith(TORCHVISION_PREFIX):
        return _image_classifier_spec(model, *_torchvision_model(model.removeprefix(TORCHVISION_PREFIX)))
    return load_transformers_model(model)


# ---- Hugging Face transformers --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class TransformersModel:
    """A transformers model class and the config it is built from; ``build`` and
    ``example_batch`` are the model-file contract's functions."""

    display_name: str
    """MODEL as the user typed it."""
    config: Any
    """The ``PretrainedConfig`` read from config.json."""
    model_class: type[Any]
    labels: Labels

    def build(self) -> Any:
        """The model with random weights, in train mode (dropout on, as in training)."""
        config = copy.deepcopy(self.config)  # each trace builds a model of its own; configs are small
        try:
            model = self.model_class(config)
        except Exception as exc:  # an inconsistent config: heads that do not divide the width, ...
            raise ModelFileError(
                f"{self.display_name}: transformers cannot build {self.model_class.__name__} from this config: "
                f"{type(exc).__name__}: {_one_line(exc)}"
            ) from None
        return model.train()

    def example_batch(self, batch_size: int, seq_len: int | None = None) -> dict[str, Any]:
        """The keyword inputs of one micro-batch, labels included where the head takes them."""
        import torch

        main = self.model_class.main_input_name
        if seq_len is not None and main in ("pixel_values", "input_values"):
            raise ModelFileError(
                f"--seq-len {seq_len}: {self.model_class.__name__} takes {main}, not token ids: drop --seq-len"
            )
        text = self.config.get_text_config()
        seq = seq_len or default_seq_len(self.config)  # token ids and token labels only
        batch: dict[str, Any] = {}
        if main == "input_ids":
            batch["input_ids"] = torch.randint(0, text.vocab_size, (batch_size, seq))
            if self.takes("pixel_values") and self.takes("return_loss"):  # a contrastive text-image model (CLIP)
                batch["pixel_values"] = _images(self.config, batch_size)
                batch["return_loss"] = True
        elif main == "pixel_values":
            batch["pixel_values"] = _images(self.config, batch_size)
        elif main == "input_features":  # Whisper: log-mel frames, two per encoder position (its stride-2 conv)
            frames = 2 * self.config.max_source_positions
            batch["input_features"] = torch.randn(batch_size, self.config.num_mel_bins, frames)
        else:  # input_values, checked in load_transformers_model
            batch["input_values"] = torch.randn(batch_size, WAVEFORM_SAMPLES)
        if self.labels is Labels.TOKENS:
            ids = batch.get("input_ids")
            batch["labels"] = ids.clone() if ids is not None else torch.randint(0, text.vocab_size, (batch_size, seq))
        elif self.labels is Labels.TOKEN_CLASSES:
            batch["labels"] = torch.randint(0, self.config.num_labels, (batch_size, seq))
        elif self.labels is Labels.CLASSES:
            # transformers' problem_type rule: one label is regression (MSE on a float), more are classes
            regression = self.config.num_labels == 1
            batch["labels"] = torch.randn(batch_size) if regression else torch.randint(0, self.config.num_labels, (batch_size,))
        elif self.labels is Labels.CTC:  # no blank: CTC's blank is the pad id 0
            batch["labels"] = torch.randint(1, text.vocab_size, (batch_size, CTC_LABEL_LEN))
        return batch

    def takes(self, argument: str) -> bool:
        return argument in inspect.signature(self.model_class.forward).parameters


def load_transformers_model(model: str) -> ModelSpec:
    """A Hugging Face model from its config.json (the file, its directory, or a Hub id)."""
    config_path = find_config(model)
    transformers = _import_transformers(model)
    config = read_config(transformers, config_path, model)
    model_class = model_class_for(transformers, config)
    if model_class is None:
        raise ModelFileError(f"{model}: transformers {transformers.__version__} has no model class for "
                             f"model_type {config.model_type!r}")
    main = model_class.main_input_name
    supported = ("input_ids", "pixel_values", "input_values", "input_features")
    if main not in supported or (main == "input_features" and not hasattr(config, "max_source_positions")):
        raise ModelFileError(
            f"{model}: dpplan makes no example batch for {model_class.__name__} (its input is {main}); "
            "write a model file (README: the model-file contract)"
        )
    # A KV cache serves generation, not training: training recipes turn it off (HF's Trainer
    # with gradient checkpointing does), and a cache would keep each layer's keys and values.
    config.use_cache = False
    name = model.rstrip("/") or model  # a directory typed with its trailing slash
    described = TransformersModel(display_name=name, config=config, model_class=model_class, labels=labels_of(model_class))
    return ModelSpec(
        path=config_path,
        factory_name=model_class.__name__,
        build_model=described.build,
        example_batch=described.example_batch,
        loss_fn=head_loss,
        display_name=name,
    )


def _import_transformers(model: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelFileError(f"{model}: planning a Hugging Face model by name needs transformers: {HF_EXTRA}") from None
    return transformers


def read_config(transformers: Any, config_path: Path, model: str) -> Any:
    """The PretrainedConfig of ``config_path``; its model_type checked first, for a clear line."""
    import json

    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{config_path}: not valid JSON: line {exc.lineno}: {exc.msg}") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {config_path}: {exc.strerror}") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not model_type:
        raise ModelFileError(f"{config_path}: no model_type (a Hugging Face config.json names its model_type)")
    if model_type not in transformers.CONFIG_MAPPING:
        custom = " (the model brings its own code, which dpplan does not run: write a model file)" if "auto_map" in data else ""
        raise ModelFileError(
            f"{model}: transformers {transformers.__version__} does not know model_type {model_type!r}{custom}"
        )
    try:
        return transformers.AutoConfig.from_pretrained(str(config_path))
    except Exception as exc:  # a value the config class rejects
        raise ModelFileError(f"{model}: transformers cannot read this config: {_one_line(exc)}") from None


def model_class_for(transformers: Any, config: Any) -> type[Any] | None:
    """The class named in ``config.architectures``, else the first training head (FALLBACK_HEADS)."""
    for name in config.architectures or ():
        found = getattr(transformers, name, None)
        if isinstance(found, type):
            return found
    from transformers.models.auto import modeling_auto

    for table in FALLBACK_HEADS:
        name = getattr(modeling_auto, table).get(config.model_type)
        if isinstance(name, tuple):  # a few bare models list their variants; the first is the model
            name = name[0]
        found = getattr(transformers, name, None) if name else None
        if isinstance(found, type):
            return found
    return None


def labels_of(model_class: type[Any]) -> Labels:
    name = model_class.__name__
    if "labels" not in inspect.signature(model_class.forward).parameters:
        return Labels.NONE
    if name.endswith(("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")):
        return Labels.CLASSES
    if name.endswith("ForTokenClassification"):
        return Labels.TOKEN_CLASSES
    if name.endswith("ForCTC"):
        return Labels.CTC
    return Labels.TOKENS


def default_seq_len(config: Any) -> int:
    """Tokens per sample without --seq-len: the largest power of two up to MAX_DEFAULT_SEQ_LEN
    and the config's first position limit."""
    text = config.get_text_config()
    limits = [value for key in POSITION_LIMIT_KEYS if isinstance(value := getattr(text, key, None), int) and value > 0]
    cap = min([MAX_DEFAULT_SEQ_LEN, *limits[:1]])
    return 1 << (cap.bit_length() - 1)


def _images(config: Any, batch_size: int) -> Any:
    import torch

    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) or IMAGENET_IMAGE_SIZE
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch_size, getattr(vision, "num_channels", IMAGE_CHANNELS), height, width)


def head_loss(output: Any, batch: Any) -> Any:
    """The head's own loss; a bare model's (no labels) is the mean of its first output, as the
    model-file contract's default loss is for a tensor."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    first = output.to_tuple()[0] if hasattr(output, "to_tuple") else output
    return first.float().mean()


def _one_line(exc: BaseException) -> str:
    """``exc``'s message on one line: transformers' config validation puts the reason on its second."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3].rstrip() + "..."


# ---- timm and torchvision image classifiers ---------------------------------------------------


def _timm_model(name: str) -> tuple[Callable[[], Any], tuple[int, int, int]]:
    """(build, input size) of timm's ``name`` (an architecture, optionally ``.tag``)."""
    try:
        import timm
    except ImportError as exc:
        raise ModelFileError(f"timm:{name} needs timm (pip install timm): {_one_line(exc)}") from None
    if not timm.is_model(name.partition(".")[0]):
        raise ModelFileError(f"timm has no model {name!r} (timm.list_models() lists them)")
    input_size = timm.get_pretrained_cfg_value(name, "input_size") or (IMAGE_CHANNELS, IMAGENET_IMAGE_SIZE, IMAGENET_IMAGE_SIZE)
    return partial(timm.create_model, name, pretrained=False), tuple(input_size)


def _torchvision_model(name: str) -> tuple[Callable[[], Any], tuple[int, int, int]]:
    """(build, input size) of torchvision's classification model ``name``."""
    try:
        import torchvision
    except (ImportError, RuntimeError) as exc:  # PyPI's torchvision fails beside a CPU torch build (RuntimeError)
        raise ModelFileError(f"torchvision:{name} needs torchvision matching torch: {_one_line(exc)}") from None
    classifiers = torchvision.models.list_models(module=torchvision.models)
    if name not in classifiers:
        raise ModelFileError(f"torchvision has no classification model {name!r} (torchvision.models.list_models())")
    return partial(torchvision.models.get_model, name, weights=None), (IMAGE_CHANNELS, IMAGENET_IMAGE_SIZE, IMAGENET_IMAGE_SIZE)


def _image_classifier_spec(model: str, build: Callable[[], Any], input_size: tuple[int, int, int]) -> ModelSpec:
    return ModelSpec(
        path=Path(model),
        factory_name=model.partition(":")[2],
        build_model=lambda: build().train(),
        example_batch=partial(image_batch, input_size=input_size, model=model),
        loss_fn=classification_loss,
        display_name=model,
    )


def image_batch(batch_size: int, seq_len: int | None = None, *, input_size: tuple[int, int, int], model: str) -> Any:
    """Images of ``input_size`` (channels, height, width): the classifier's ``forward(x)``."""
    import torch

    if seq_len is not None:
        raise ModelFileError(f"--seq-len {seq_len}: {model} takes images, not token ids: drop --seq-len")
    return torch.randn(batch_size, *input_size)


def classification_loss(output: Any, batch: Any) -> Any:
    """Cross-entropy of the logits against class 0 (the labels' values change no memory). An
    Inception or GoogLeNet in train mode returns (logits, aux logits): the logits are trained."""
    import torch

    logits = output[0] if isinstance(output, tuple) else output
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return torch.nn.functional.cross_entropy(logits, labels)
