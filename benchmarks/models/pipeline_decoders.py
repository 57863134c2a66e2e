"""Hugging Face decoders of the transformers zoo (benchmarks/models/hf/zoo.py), 8 layers deep,
for the pipeline-parallel accuracy suite: the zoo's 2 layers cannot make the 8 stages of
interleaved 1F1B over 4 ranks (2 stages per rank). They have no pipeline hooks: dpplan cuts
them itself (training/pipeline_parallel.py ``DecoderStage``, with the causal-LM loss).

    llama  qwen2   (factories: benchmarks/models/pipeline_decoders.py:llama)
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "hf"))

from zoo import ZOO, loss_fn  # noqa: E402

NUM_LAYERS = 8
"""pp 4 x 2 virtual stages (training/pipeline_layout.py ``VIRTUAL_STAGES``): one layer each."""


def _build(name: str):
    entry = ZOO[name]
    return replace(entry, config={**entry.config, "num_hidden_layers": NUM_LAYERS}).build_model()


def llama():
    return _build("llama")  # grouped-query attention (2 KV heads): tp 2 at most


def qwen2():
    return _build("qwen2")  # biases on q, k and v


def example_batch(batch_size):
    return ZOO["llama"].batch(batch_size)  # the two share VOCAB and SEQ: token ids and labels


__all__ = ["llama", "qwen2", "example_batch", "loss_fn"]
