"""A third-party model zoo: small Hugging Face `transformers` models, one registry entry each.

Every entry names a transformers model class with a training loss head, the ``model_type`` of
its config and a small config (hidden 64-128, 2 layers or 2 per stack, 4 heads, vocab 1000),
and the inputs of one micro-batch (labels included, so ``output.loss`` exists). Models are built
with ``Class(config)`` (random init, nothing read from the Hub) in train mode, and inputs with
``torch.randint``/``torch.randn``, so both work under ``with torch.device("meta"):``.

A model file of the zoo is three lines:

    from zoo import model_file
    build_model, example_batch, loss_fn = model_file("llama")
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub; fail instead of reaching it

import torch
import transformers

VOCAB, SEQ, HIDDEN, HEADS, LAYERS = 1000, 64, 64, 4, 2
NUM_LABELS, IMAGE = 10, 32


@dataclass(frozen=True)
class Entry:
    model_class: str
    """Class name in `transformers` (one with a training loss head)."""
    model_type: str
    """Config key for `AutoConfig.for_model`."""
    config: dict[str, Any]
    batch: Callable[[int], dict]
    """batch_size -> the keyword inputs of one micro-batch."""
    kind: str = field(default="", compare=False)

    def build_config(self):
        return transformers.AutoConfig.for_model(self.model_type, **self.config)

    def build_model(self):
        cls = getattr(transformers, self.model_class)
        model = cls(self.build_config())
        return model.train()


# ---- inputs, one helper per kind --------------------------------------------------------


def tokens(batch_size, seq=SEQ, vocab=VOCAB, low=0):
    """Decoder LM (labels shifted inside the model) or masked LM (every position predicted)."""
    ids = torch.randint(low, vocab, (batch_size, seq))
    return {"input_ids": ids, "labels": ids.clone()}


def seq2seq(batch_size, src=SEQ, tgt=SEQ // 2, vocab=VOCAB, low=3, **flags):
    """Encoder input and decoder labels (the model builds decoder inputs by shifting them)."""
    return {
        "input_ids": torch.randint(low, vocab, (batch_size, src)),
        "labels": torch.randint(low, vocab, (batch_size, tgt)),
        **flags,
    }


def audio(batch_size, samples=16000, label_len=8, vocab=32):
    """Raw 16 kHz waveform and CTC targets (no blank/pad id 0)."""
    return {
        "input_values": torch.randn(batch_size, samples),
        "labels": torch.randint(1, vocab, (batch_size, label_len)),
    }


def audio_features(batch_size, mels=80, frames=200, tgt=SEQ // 2, vocab=VOCAB):
    """Log-mel frames (10 ms hop: 200 frames = 2 s) and decoder labels (Whisper)."""
    return {
        "input_features": torch.randn(batch_size, mels, frames),
        "labels": torch.randint(3, vocab, (batch_size, tgt)),
    }


def images(batch_size, size=IMAGE, classes=NUM_LABELS):
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size),
        "labels": torch.randint(0, classes, (batch_size,)),
    }


def contrastive(batch_size, seq=SEQ // 2, size=IMAGE, vocab=VOCAB):
    """Paired texts and images; the model's own contrastive loss (return_loss=True)."""
    return {
        "input_ids": torch.randint(3, vocab, (batch_size, seq)),
        "pixel_values": torch.randn(batch_size, 3, size, size),
        "return_loss": True,
    }


# ---- configs ----------------------------------------------------------------------------

SDPA = {"attn_implementation": "sdpa"}
DECODER = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "intermediate_size": 4 * HIDDEN,
    "max_position_embeddings": 128, "use_cache": False, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, **SDPA,
}
MOE = {**DECODER, "intermediate_size": 2 * HIDDEN, "num_key_value_heads": 2, "output_router_logits": True}
BERT = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "intermediate_size": 4 * HIDDEN, "max_position_embeddings": 128, **SDPA,
}
VIT = {
    "image_size": IMAGE, "patch_size": 4, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "intermediate_size": 4 * HIDDEN, "num_labels": NUM_LABELS, **SDPA,
}
WAV2VEC2 = {
    "vocab_size": 32, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "intermediate_size": 4 * HIDDEN, "conv_dim": (64,) * 7, "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4, "layerdrop": 0.0,  # no random layer skipping
    "mask_time_prob": 0.2, "mask_time_length": 5,  # SpecAugment time masking, active in train()
    **SDPA,
}
TOWER = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": 4 * HIDDEN}
TEXT_TOWER = {**TOWER, "vocab_size": VOCAB, "max_position_embeddings": SEQ // 2, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2}
VISION_TOWER = {**TOWER, "image_size": IMAGE, "patch_size": 4}

DECODERS = {
    "llama": Entry("LlamaForCausalLM", "llama", {**DECODER, "num_key_value_heads": 2}, tokens),  # GQA
    "mistral": Entry("MistralForCausalLM", "mistral", {**DECODER, "num_key_value_heads": 2, "sliding_window": 16}, tokens),
    "qwen2": Entry("Qwen2ForCausalLM", "qwen2", {**DECODER, "num_key_value_heads": 2}, tokens),
    "qwen3": Entry("Qwen3ForCausalLM", "qwen3", {**DECODER, "num_key_value_heads": 2, "head_dim": 16}, tokens),
    "gemma2": Entry("Gemma2ForCausalLM", "gemma2", {**DECODER, "num_key_value_heads": 2, "head_dim": 16,
                                                    "sliding_window": 16, "query_pre_attn_scalar": 16,
                                                    "attn_implementation": "eager"}, tokens),  # softcapping: no sdpa
    "gemma3": Entry("Gemma3ForCausalLM", "gemma3_text", {**DECODER, "num_key_value_heads": 2, "head_dim": 16,
                                                         "sliding_window": 16, "query_pre_attn_scalar": 16,
                                                         "layer_types": ["sliding_attention", "full_attention"]}, tokens),
    "phi3": Entry("Phi3ForCausalLM", "phi3", {**DECODER, "num_key_value_heads": 2}, tokens),
    "gpt2": Entry("GPT2LMHeadModel", "gpt2", {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS,
                                              "n_positions": 128, "bos_token_id": 1, "eos_token_id": 2,
                                              "use_cache": False, **SDPA}, tokens),
    "gpt_neox": Entry("GPTNeoXForCausalLM", "gpt_neox", DECODER, tokens),
    "falcon": Entry("FalconForCausalLM", "falcon", {**DECODER, "ffn_hidden_size": 4 * HIDDEN}, tokens),  # multi-query
    "opt": Entry("OPTForCausalLM", "opt", {**DECODER, "ffn_dim": 4 * HIDDEN, "word_embed_proj_dim": HIDDEN}, tokens),
}

MOES = {
    "mixtral": Entry("MixtralForCausalLM", "mixtral", {**MOE, "num_local_experts": 4, "num_experts_per_tok": 2}, tokens),
    "qwen2_moe": Entry("Qwen2MoeForCausalLM", "qwen2_moe", {**MOE, "num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": HIDDEN,
                                                            "shared_expert_intermediate_size": 2 * HIDDEN}, tokens),
    "qwen3_moe": Entry("Qwen3MoeForCausalLM", "qwen3_moe", {**MOE, "head_dim": 16, "num_experts": 4,
                                                            "num_experts_per_tok": 2, "moe_intermediate_size": HIDDEN}, tokens),
    "olmoe": Entry("OlmoeForCausalLM", "olmoe", {**MOE, "num_experts": 4, "num_experts_per_tok": 2}, tokens),
    "deepseek_v3": Entry("DeepseekV3ForCausalLM", "deepseek_v3", {  # MLA attention; layer 0 dense, layer 1 MoE
        **MOE, "output_router_logits": False, "num_key_value_heads": HEADS, "moe_intermediate_size": HIDDEN,
        "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16, "v_head_dim": 16}, tokens),
    "switch": Entry("SwitchTransformersForConditionalGeneration", "switch_transformers", {  # encoder-decoder, top-1
        "vocab_size": VOCAB, "d_model": HIDDEN, "d_kv": 16, "d_ff": 2 * HIDDEN, "num_layers": LAYERS,
        "num_decoder_layers": LAYERS, "num_heads": HEADS, "num_experts": 4, "expert_capacity": 32,
        "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1, "decoder_start_token_id": 0,
        "use_cache": False}, partial(seq2seq, output_router_logits=True)),  # + router z-loss and aux loss
}

SEQ2SEQ = {
    "t5": Entry("T5ForConditionalGeneration", "t5", {
        "vocab_size": VOCAB, "d_model": HIDDEN, "d_kv": 16, "d_ff": 2 * HIDDEN, "num_layers": LAYERS,
        "num_decoder_layers": LAYERS, "num_heads": HEADS, "decoder_start_token_id": 0, "use_cache": False}, seq2seq),
    "bart": Entry("BartForConditionalGeneration", "bart", {
        "vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
        "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS, "encoder_ffn_dim": 2 * HIDDEN,
        "decoder_ffn_dim": 2 * HIDDEN, "max_position_embeddings": 128, "use_cache": False, **SDPA}, seq2seq),
}

AUDIO = {
    "whisper": Entry("WhisperForConditionalGeneration", "whisper", {
        "vocab_size": VOCAB, "num_mel_bins": 80, "d_model": HIDDEN, "encoder_layers": LAYERS,
        "decoder_layers": LAYERS, "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
        "encoder_ffn_dim": 2 * HIDDEN, "decoder_ffn_dim": 2 * HIDDEN, "max_source_positions": 100,
        "max_target_positions": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "decoder_start_token_id": 1, "use_cache": False, **SDPA}, audio_features),
    "wav2vec2": Entry("Wav2Vec2ForCTC", "wav2vec2", WAV2VEC2, audio),
    "hubert": Entry("HubertForCTC", "hubert", WAV2VEC2, audio),
}

ENCODERS = {
    "bert": Entry("BertForMaskedLM", "bert", BERT, tokens),
    "roberta": Entry("RobertaForMaskedLM", "roberta", {**BERT, "max_position_embeddings": SEQ + 2}, partial(tokens, low=3)),
    "distilbert": Entry("DistilBertForMaskedLM", "distilbert", {
        "vocab_size": VOCAB, "dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": 4 * HIDDEN,
        "max_position_embeddings": 128, **SDPA}, tokens),
}

VISION = {
    "vit": Entry("ViTForImageClassification", "vit", VIT, images),
    "deit": Entry("DeiTForImageClassification", "deit", VIT, images),
    "beit": Entry("BeitForImageClassification", "beit", {**VIT, "use_relative_position_bias": True}, images),
    "swin": Entry("SwinForImageClassification", "swin", {  # 64x64 -> 16x16 tokens, 4x4 windows, then 8x8
        "image_size": 64, "patch_size": 4, "embed_dim": HIDDEN, "depths": [2, 2], "num_heads": [HEADS, HEADS],
        "window_size": 4, "num_labels": NUM_LABELS}, partial(images, size=64)),
    "convnext": Entry("ConvNextForImageClassification", "convnext", {
        "num_stages": 2, "hidden_sizes": [HIDDEN, 2 * HIDDEN], "depths": [2, 2], "num_labels": NUM_LABELS},
        partial(images, size=64)),
    "resnet": Entry("ResNetForImageClassification", "resnet", {  # BatchNorm
        "embedding_size": HIDDEN, "hidden_sizes": [HIDDEN, 2 * HIDDEN], "depths": [2, 2], "layer_type": "basic",
        "num_labels": NUM_LABELS}, partial(images, size=64)),
}

SSM = {
    "mamba": Entry("MambaForCausalLM", "mamba", {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "state_size": 16,
        "expand": 2, "use_cache": False}, tokens),
    "mamba2": Entry("Mamba2ForCausalLM", "mamba2", {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "state_size": 16,
        "expand": 2, "num_heads": HEADS, "head_dim": 2 * HIDDEN // HEADS, "n_groups": 1, "chunk_size": 32,
        "use_cache": False}, tokens),
}

CONTRASTIVE = {
    "clip": Entry("CLIPModel", "clip", {"text_config": TEXT_TOWER, "vision_config": VISION_TOWER,
                                        "projection_dim": HIDDEN, **SDPA}, contrastive),
    "siglip": Entry("SiglipModel", "siglip", {"text_config": TEXT_TOWER, "vision_config": VISION_TOWER, **SDPA},
                    contrastive),
}

GROUPS = {"decoder": DECODERS, "moe": MOES, "seq2seq": SEQ2SEQ, "audio": AUDIO, "encoder": ENCODERS,
          "vision": VISION, "ssm": SSM, "contrastive": CONTRASTIVE}
ZOO: dict[str, Entry] = {
    name: Entry(e.model_class, e.model_type, e.config, e.batch, kind)
    for kind, group in GROUPS.items() for name, e in group.items()
}


def loss_fn(output, batch):
    return output.loss


def model_file(name: str):
    """(build_model, example_batch, loss_fn) of the zoo entry ``name``, for a model file."""
    entry = ZOO[name]
    return entry.build_model, entry.batch, loss_fn
