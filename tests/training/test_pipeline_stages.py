"""dpplan's cut of a Hugging Face decoder into pipeline stages (training/pipeline_parallel.py
``DecoderStage``): run in order, the stages compute the whole model's logits and loss."""

import pytest
import torch

from dpplan.training.pipeline_parallel import DecoderStage, causal_lm_loss, is_hf_decoder
from dpplan.training.units import find_units

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("num_stages", [2, 3])
def test_stages_in_order_are_the_whole_model(num_stages):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    assert is_hf_decoder(model)
    ids = torch.randint(0, 128, (2, 10))
    whole = model(input_ids=ids, labels=ids)
    stages = [DecoderStage(model, i, num_stages) for i in range(num_stages)]
    x = ids
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, whole.logits, rtol=0, atol=1e-6)
    assert causal_lm_loss(x, ids).item() == pytest.approx(whole.loss.item(), rel=1e-6)
    # the layers split evenly in order, the first stages one more; each stage's layers are its units
    assert [s.layer_indices for s in stages] == ([(0, 1), (2, 3)] if num_stages == 2 else [(0, 1), (2,), (3,)])
    assert [len(find_units(s)) for s in stages] == [len(s.layer_indices) for s in stages]
    assert stages[0].embed_tokens is model.model.embed_tokens and stages[-1].lm_head is model.lm_head
    assert all(s.lm_head is None for s in stages[:-1]) and all(s.embed_tokens is None for s in stages[1:])


def test_an_moe_decoders_boundaries_are_known_without_running_it():
    """Mixtral's routing cannot run on meta; its stage boundaries come from the embedding and head."""
    from dpplan.training.pipeline_parallel import boundary_shapes

    config = transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        use_cache=False)
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config)
    stages = [DecoderStage(model, i, 2) for i in range(2)]
    shapes = boundary_shapes(stages, torch.zeros(3, 10, dtype=torch.long))
    assert [(tuple(a.shape), tuple(b.shape)) for a, b in shapes] == [((3, 10), (3, 10, 32)), ((3, 10, 32), (3, 10, 128))]
    assert shapes[0][1].dtype == torch.float32
