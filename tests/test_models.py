import pytest
import torch

from quiver.errors import QuiverError
from quiver.models import fingerprint, linear_module_shapes, load_base


def test_tiny_model_is_deterministic_and_named(tiny):
    model, tokenizer = tiny
    again, _ = load_base("tiny-llama", device="cpu")
    assert model.config._name_or_path == "tiny-llama"
    assert fingerprint(model) == fingerprint(again)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids).logits, again(ids).logits)


def test_fingerprint_ignores_dtype_but_not_weights(tiny):
    model, _ = tiny
    bf16, _ = load_base("tiny-llama", device="cpu", dtype=torch.bfloat16)
    assert fingerprint(bf16) == fingerprint(model)
    with torch.no_grad():
        bf16.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert fingerprint(bf16) != fingerprint(model)


def test_linear_module_shapes_lists_adaptable_layers(tiny):
    shapes = linear_module_shapes(tiny[0])
    assert shapes["model.layers.0.self_attn.q_proj"] == [64, 64]
    assert shapes["model.layers.1.mlp.down_proj"] == [128, 64]
    assert "lm_head" not in shapes


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(QuiverError, match="cannot load base model"):
        load_base(str(tmp_path / "no-such-model"))


@pytest.mark.integration
def test_embedded_smollm2_loads_from_cache_and_answers():
    model, tokenizer = load_base("smollm2-135m", device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
