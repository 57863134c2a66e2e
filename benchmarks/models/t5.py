"""T5-style encoder-decoder: shared token embedding, RMS LayerNorm without bias (computed in
fp32), bucketed relative-position biases (one table in the first layer of each stack, shared by
the rest), self-attention with the bias as a float ``attn_mask``, causal decoder
self-attention, cross-attention to the encoder output, gated-GELU feed-forward, and a
teacher-forced cross-entropy on an untied LM head.

The encoder and decoder layers live in one nn.ModuleList (encoder first), which makes every
layer an FSDP unit."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, SRC, TGT, HIDDEN, HEADS, FFN = 8000, 192, 128, 256, 4, 640
ENC_LAYERS, DEC_LAYERS = 3, 3
BUCKETS, MAX_DISTANCE = 32, 128


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_bucket(relative, bidirectional):
    """T5's bucketing: exact buckets for short distances, logarithmic ones beyond."""
    buckets = BUCKETS
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out = out + (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    large = exact + (
        torch.log(relative.float().clamp(min=1) / exact) / math.log(MAX_DISTANCE / exact) * (buckets - exact)
    ).long()
    large = torch.clamp(large, max=buckets - 1)
    return out + torch.where(relative < exact, relative, large)


class Attention(nn.Module):
    def __init__(self, relative_bias=False, bidirectional=True):
        super().__init__()
        self.q = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.kv = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.o = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.bidirectional = bidirectional
        self.bias_table = nn.Embedding(BUCKETS, HEADS) if relative_bias else None

    def position_bias(self, q_len, k_len, device):
        context = torch.arange(q_len, device=device)[:, None]
        memory = torch.arange(k_len, device=device)[None, :]
        buckets = relative_bucket(memory - context, self.bidirectional)
        return self.bias_table(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, q, k)

    def forward(self, x, context, bias):
        b, s, h = x.shape
        q = self.q(x).view(b, s, HEADS, h // HEADS).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, HEADS, h // HEADS).permute(2, 0, 3, 1, 4)
        # T5 does not scale the scores; SDPA's default 1/sqrt(d) is kept here regardless.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(y.transpose(1, 2).reshape(b, s, h))


class GatedGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.wi = nn.Linear(HIDDEN, 2 * FFN, bias=False)
        self.wo = nn.Linear(FFN, HIDDEN, bias=False)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        gate, up = self.wi(x).chunk(2, dim=-1)
        return self.wo(self.drop(F.gelu(gate, approximate="tanh") * up))


class EncoderLayer(nn.Module):
    def __init__(self, first):
        super().__init__()
        self.norm1 = RMSNorm(HIDDEN)
        self.attn = Attention(relative_bias=first, bidirectional=True)
        self.norm2 = RMSNorm(HIDDEN)
        self.ffn = GatedGelu()
        self.drop = nn.Dropout(0.1)

    def forward(self, x, bias):
        if bias is None:
            bias = self.attn.position_bias(x.shape[1], x.shape[1], x.device).to(x.dtype)
        y = self.norm1(x)
        x = x + self.drop(self.attn(y, y, bias))
        return x + self.drop(self.ffn(self.norm2(x))), bias


class DecoderLayer(nn.Module):
    def __init__(self, first):
        super().__init__()
        self.norm1 = RMSNorm(HIDDEN)
        self.self_attn = Attention(relative_bias=first, bidirectional=False)
        self.norm2 = RMSNorm(HIDDEN)
        self.cross_attn = Attention()
        self.norm3 = RMSNorm(HIDDEN)
        self.ffn = GatedGelu()
        self.drop = nn.Dropout(0.1)

    def forward(self, x, memory, bias):
        s = x.shape[1]
        if bias is None:
            bias = self.self_attn.position_bias(s, s, x.device)
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            bias = bias.masked_fill(~causal, float("-inf")).to(x.dtype)
        y = self.norm1(x)
        x = x + self.drop(self.self_attn(y, y, bias))
        x = x + self.drop(self.cross_attn(self.norm2(x), memory, None))
        return x + self.drop(self.ffn(self.norm3(x))), bias


class T5(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(
            [EncoderLayer(i == 0) for i in range(ENC_LAYERS)] + [DecoderLayer(i == 0) for i in range(DEC_LAYERS)]
        )
        self.enc_norm = RMSNorm(HIDDEN)
        self.dec_norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.drop = nn.Dropout(0.1)

    def forward(self, input_ids, decoder_input_ids, labels):
        x = self.drop(self.shared(input_ids))
        bias = None
        for layer in self.layers[:ENC_LAYERS]:
            x, bias = layer(x, bias)
        memory = self.drop(self.enc_norm(x))
        y = self.drop(self.shared(decoder_input_ids))
        bias = None
        for layer in self.layers[ENC_LAYERS:]:
            y, bias = layer(y, memory, bias)
        logits = self.lm_head(self.drop(self.dec_norm(y)))
        return F.cross_entropy(logits.float().view(-1, VOCAB), labels.view(-1))


def build_model():
    return T5()


def example_batch(batch_size):
    labels = torch.randint(1, VOCAB, (batch_size, TGT))
    decoder_input_ids = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    return {
        "input_ids": torch.randint(1, VOCAB, (batch_size, SRC)),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
    }


def loss_fn(output, batch):
    return output
