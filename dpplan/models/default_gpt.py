"""The bundled default model: a small GPT-style decoder (about 30 M parameters).

`dpplan estimate` and `dpplan profile` use it when no model file is given, so a new
user sees a plan at once. It follows the model-file contract (see README).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB_SIZE = 16384
SEQ_LEN = 256
HIDDEN = 512
NUM_LAYERS = 6
NUM_HEADS = 8


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.head_dim = hidden // num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        batch, seq, _ = x.shape
        # qkv's features laid out head by head, (heads, q|k|v, head_dim), and reshaped by -1
        # heads: split by columns over --tp ranks, each rank holds whole heads (Megatron's layout)
        q, k, v = self.qkv(x).view(batch, seq, -1, 3, self.head_dim).unbind(3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attn.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.fc_out = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, num_heads)
        self.ln_2 = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=VOCAB_SIZE, seq=SEQ_LEN, hidden=HIDDEN, layers=NUM_LAYERS, heads=NUM_HEADS):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, labels):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def build_model():
    return GPT()


def example_batch(batch_size, seq_len=None):
    seq_len = SEQ_LEN if seq_len is None else seq_len
    if seq_len > SEQ_LEN:
        raise ValueError(f"the bundled GPT has {SEQ_LEN} positions; --seq-len {seq_len} is longer")
    ids = torch.randint(0, VOCAB_SIZE, (batch_size, seq_len))
    return {"input_ids": ids, "labels": ids}


def loss_fn(output, batch):
    return output


class GPTStage(nn.Module):
    """One pipeline stage of the GPT (``--pp``): the embeddings on the first, a slice of the
    blocks, the final norm and head on the last; takes the input ids or the hidden states,
    returns the hidden states or the logits."""

    def __init__(self, model: GPT, stage_index: int, num_stages: int):
        super().__init__()
        from dpplan.training.pipeline_layout import split_layers

        blocks = split_layers(len(model.blocks), num_stages)[stage_index]
        first, last = stage_index == 0, stage_index == num_stages - 1
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = model.pos_emb if first else None
        self.blocks = nn.ModuleList(model.blocks[i] for i in blocks)
        self.ln_f = model.ln_f if last else None
        self.head = model.head if last else None

    def forward(self, x):
        if self.tok_emb is not None:
            positions = torch.arange(x.shape[1], device=x.device)
            x = self.tok_emb(x) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(self.ln_f(x))
        return x


def pipeline_stage(model, stage_index, num_stages):
    return GPTStage(model, stage_index, num_stages)


def pipeline_loss(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
