"""Llama (GQA) from transformers (config in zoo.py)."""
from zoo import model_file

build_model, example_batch, loss_fn = model_file("llama")
