"""A model of unusual parts, to stress the tracer:

- ``SquaredReLU``: a custom ``torch.autograd.Function`` that saves its input for backward;
- parameters shared across modules: the input embedding is also the output projection, and
  one ``temperature`` parameter is held by two different submodules;
- a buffer-driven op: each block normalizes by a running mean-square kept in a buffer that
  the forward updates in place (like BatchNorm's running stats, but used in training too);
- a depthwise causal ``conv1d`` over the sequence, ``einsum`` mixing, an ``nn.LSTM`` layer
  (kept in fp32 under autocast);
- a non-standard output: a dict subclass with attribute access whose ``loss`` the default
  loss picks up (no ``loss_fn`` in this file).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, SEQ, HIDDEN, LAYERS, KERNEL, MIX = 6000, 128, 256, 4, 4, 768


class SquaredReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.relu(x).square()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * F.relu(x)


class Output(dict):
    """Dict whose keys are also attributes (like a Hugging Face ModelOutput)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        # Shape (1,), not (): FSDP2's fully_shard rejects 0-dim parameters.
        self.value = nn.Parameter(torch.ones(1))


class RunningRMSNorm(nn.Module):
    """Scales by 1/sqrt(running mean square); the running value is a buffer updated in forward."""

    def __init__(self, dim, momentum=0.05, eps=1e-5):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))
        self.register_buffer("running_sq", torch.ones(dim))
        self.momentum, self.eps = momentum, eps

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                batch_sq = x.detach().float().pow(2).mean(dim=(0, 1))
                self.running_sq.mul_(1 - self.momentum).add_(batch_sq, alpha=self.momentum)
        return x * torch.rsqrt(self.running_sq + self.eps).to(x.dtype) * self.gain


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = RunningRMSNorm(HIDDEN)
        self.conv = nn.Conv1d(HIDDEN, HIDDEN, KERNEL, groups=HIDDEN)
        self.mix_in = nn.Parameter(torch.randn(HIDDEN, MIX) * HIDDEN**-0.5)
        self.mix_out = nn.Parameter(torch.randn(MIX, HIDDEN) * MIX**-0.5)

    def forward(self, x):
        y = self.norm(x).transpose(1, 2)  # (B, H, S)
        y = self.conv(F.pad(y, (KERNEL - 1, 0))).transpose(1, 2)  # causal
        y = SquaredReLU.apply(torch.einsum("bsh,hm->bsm", y, self.mix_in))
        return x + torch.einsum("bsm,mh->bsh", y, self.mix_out)


class CustomModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.lstm = nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.final_norm = nn.LayerNorm(HIDDEN)
        self.scale_in = Temperature()
        self.scale_out = Temperature()
        self.scale_out.value = self.scale_in.value  # one parameter, two modules

    def forward(self, tokens, targets):
        x = self.embed(tokens) * self.scale_in.value
        # The LSTM runs in fp32 even under autocast (oneDNN's bf16 LSTM needs avx512_bf16).
        with torch.autocast(x.device.type, enabled=False):
            x, _ = self.lstm(x.float())
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.final_norm(x), self.embed.weight) / self.scale_out.value  # tied
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))
        return Output(loss=loss, logits=logits)


def build_model():
    return CustomModel()


def example_batch(batch_size):
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ))
    return {"tokens": tokens, "targets": torch.roll(tokens, -1, dims=1)}
