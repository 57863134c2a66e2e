"""dpplan: plan and profile the memory of multi-GPU PyTorch training."""

__version__ = "0.1.0"
