"""Decoder with mixture-of-experts MLPs (GShard / Switch style, static shapes throughout).

Each layer: pre-norm causal attention, then a top-2 router over EXPERTS experts with a FIXED
capacity per expert. Tokens are placed in expert slots with one-hot masks and a cumulative
sum (a token past an expert's capacity is dropped: its combine weight is zero), dispatched to
an (experts, capacity, hidden) tensor with einsum, run through each expert's own MLP, and
combined back with einsum. Every MoE layer adds a load-balancing auxiliary loss
(Switch Transformer: experts * sum(fraction routed * mean gate probability)).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, SEQ, HIDDEN, LAYERS, HEADS = 4096, 128, 192, 4, 4
EXPERTS, TOP_K, EXPERT_FFN, CAPACITY_FACTOR = 8, 2, 384, 1.25
AUX_WEIGHT = 0.01


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(HIDDEN, EXPERT_FFN)
        self.down = nn.Linear(EXPERT_FFN, HIDDEN)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))

    def forward(self, x):
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)
        n = tokens.shape[0]
        capacity = int(CAPACITY_FACTOR * TOP_K * n / EXPERTS)
        probs = F.softmax(self.router(tokens).float(), dim=-1)  # (n, E), routing in fp32
        top_p, top_i = probs.topk(TOP_K, dim=-1)  # (n, k)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        masks = F.one_hot(top_i, EXPERTS).to(probs.dtype)  # (n, k, E)
        # Slot of each (token, choice) in its expert: first choices fill before second ones.
        flat = masks.transpose(0, 1).reshape(TOP_K * n, EXPERTS)
        slots = (torch.cumsum(flat, dim=0) - 1).reshape(TOP_K, n, EXPERTS).transpose(0, 1)
        kept = masks * (slots < capacity).to(masks.dtype)  # dropped past capacity
        slot = (slots * kept).sum(-1).long()  # (n, k)
        slot_onehot = F.one_hot(slot, capacity).to(probs.dtype)  # (n, k, C)
        dispatch = torch.einsum("nke,nkc->nec", kept, slot_onehot)  # (n, E, C) 0/1
        combine = torch.einsum("nk,nke,nkc->nec", top_p, kept, slot_onehot)  # gate weights
        expert_in = torch.einsum("nec,nh->ech", dispatch.to(tokens.dtype), tokens)  # (E, C, h)
        expert_out = torch.stack([expert(expert_in[e]) for e, expert in enumerate(self.experts)])
        out = torch.einsum("nec,ech->nh", combine.to(expert_out.dtype), expert_out)
        fraction = masks[:, 0].mean(0)  # share of first choices per expert
        aux = EXPERTS * (fraction * probs.mean(0)).sum()
        return out.reshape(b, s, h), aux


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.moe = MoE()

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, HEADS, h // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, h))
        moe_out, aux = self.moe(self.norm2(x))
        return x + moe_out, aux


class MoEDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Embedding(SEQ, HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        aux_total = 0.0
        for layer in self.layers:
            x, aux = layer(x)
            aux_total = aux_total + aux
        logits = self.head(self.norm(x))
        lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        return lm + AUX_WEIGHT * aux_total


def build_model():
    return MoEDecoder()


def example_batch(batch_size):
    return {"tokens": torch.randint(0, VOCAB, (batch_size, SEQ))}


def loss_fn(output, batch):
    return output
