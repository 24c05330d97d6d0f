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


def test_device_and_dtype_default_to_cuda_bf16_when_a_gpu_is_seen(monkeypatch):
    from quiver.models import pick_device_and_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device_and_dtype() == (torch.device("cuda"), torch.bfloat16)
    assert pick_device_and_dtype(dtype="fp32") == (torch.device("cuda"), torch.float32)
    assert pick_device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device_and_dtype(dtype="auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(QuiverError, match="unknown dtype"):
        pick_device_and_dtype(dtype="fp8")


def test_routed_layers_live_on_the_base_layers_device_and_dtype():
    """What `attach_experts` allocates follows the base weights (on a GPU: cuda, bf16)."""
    from quiver.library.expert import Expert, ExpertInfo
    from quiver.routing import RoutedLinear, UniformRouter, attach_experts, detach_experts

    model, _ = load_base("tiny-llama", device="cpu", dtype=torch.bfloat16)
    module = "model.layers.0.self_attn.q_proj"
    weights = {f"base_model.model.{module}.lora_A.weight": torch.randn(2, 64),
               f"base_model.model.{module}.lora_B.weight": torch.randn(64, 2)}
    info = ExpertInfo(name="e", tasks=[], base_model="tiny-llama", base_fingerprint=None,
                      lora={"r": 2})
    expert = Expert(info, {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"],
                           "layers_to_transform": [0], "peft_type": "LORA"}, weights=weights)
    attach_experts(model, [expert], UniformRouter())
    layer = model.get_submodule(module)
    assert isinstance(layer, RoutedLinear)
    tensors = [layer.a_stack, layer.b_rows, layer.local_index]
    assert all(t.device == layer.base.weight.device for t in tensors)
    assert layer.a_stack.dtype == layer.b_rows.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3]])
    assert model(ids).logits.dtype == torch.bfloat16
    detach_experts(model)
