"""BERT-style encoder: word + position + token-type embeddings, post-norm LayerNorm blocks,
a padding mask handed to scaled_dot_product_attention as ``attn_mask``, GELU MLP, and a
masked-language-model head (dense, GELU, LayerNorm, decoder tied to the word embeddings) whose
loss ignores unmasked positions (label -100)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, SEQ, HIDDEN, LAYERS, HEADS, FFN, TYPES = 8192, 128, 256, 4, 4, 1024, 2
PAD_TAIL = 24  # the last PAD_TAIL positions of every second sequence are padding


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.norm_attn = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.ffn_in = nn.Linear(HIDDEN, FFN)
        self.ffn_out = nn.Linear(FFN, HIDDEN)
        self.norm_ffn = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, mask):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, h // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        x = self.norm_attn(x + self.drop(self.out(y.transpose(1, 2).reshape(b, s, h))))
        return self.norm_ffn(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


class Bert(nn.Module):
    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.position = nn.Embedding(SEQ, HIDDEN)
        self.token_type = nn.Embedding(TYPES, HIDDEN)
        self.embed_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.embed_drop = nn.Dropout(0.1)
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))
        self.head_dense = nn.Linear(HIDDEN, HIDDEN)
        self.head_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.decoder = nn.Linear(HIDDEN, VOCAB)
        self.decoder.weight = self.word.weight  # tied, bias separate

    def forward(self, input_ids, token_type_ids, attention_mask, labels):
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        x = self.embed_drop(self.embed_norm(x))
        # (B, 1, 1, S) boolean: True where the key may be attended to.
        mask = attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask)
        logits = self.decoder(self.head_norm(F.gelu(self.head_dense(x))))
        loss = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
        return {"loss": loss, "logits": logits}


def build_model():
    return Bert()


def example_batch(batch_size):
    input_ids = torch.randint(1, VOCAB, (batch_size, SEQ))
    attention_mask = torch.ones(batch_size, SEQ, dtype=torch.long)
    attention_mask[1::2, SEQ - PAD_TAIL:] = 0
    input_ids = input_ids * attention_mask  # padding id 0
    token_type_ids = torch.zeros(batch_size, SEQ, dtype=torch.long)
    token_type_ids[:, SEQ // 2:] = 1
    # 15% of the positions carry a label (fixed positions: shapes never depend on data).
    chosen = (torch.arange(SEQ) % 7 == 3).expand(batch_size, SEQ)
    labels = torch.where(chosen & attention_mask.bool(), torch.randint(1, VOCAB, (batch_size, SEQ)), -100)
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }


def loss_fn(output, batch):
    return output["loss"]
