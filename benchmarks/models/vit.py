"""Vision transformer for 3x64x64 images: 4x4 patches (256 tokens + class token) embedded by a strided conv2d, a class
token, learned position embeddings, pre-norm blocks with nn.MultiheadAttention (batch_first,
``need_weights=False`` as timm-style training code calls it) and a GELU MLP, and a
cross-entropy loss on the class token."""

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE, PATCH, CLASSES = 64, 4, 100
HIDDEN, LAYERS, HEADS, MLP = 256, 6, 8, 1024
TOKENS = (IMAGE // PATCH) ** 2 + 1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN, eps=1e-6)
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, dropout=0.0, batch_first=True)
        self.norm2 = nn.LayerNorm(HIDDEN, eps=1e-6)
        self.fc1 = nn.Linear(HIDDEN, MLP)
        self.fc2 = nn.Linear(MLP, HIDDEN)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        y = self.norm1(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        x = x + self.drop(y)
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm2(x))))))


class ViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, HIDDEN, PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, HIDDEN))
        self.pos = nn.Parameter(torch.randn(1, TOKENS, HIDDEN) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN, eps=1e-6)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, images, labels):
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, 64, H)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.norm(x)[:, 0]), labels)


def build_model():
    return ViT()


def example_batch(batch_size):
    return {
        "images": torch.randn(batch_size, 3, IMAGE, IMAGE),
        "labels": torch.randint(0, CLASSES, (batch_size,)),
    }


def loss_fn(output, batch):
    return output
