import zlib

import pytest
import torch
from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model

import quiver
from quiver.errors import QuiverError
from quiver.routing import MIXTURES, detach_experts
from quiver.routing.layer import MixtureStrategy
from quiver.transforms.arrow import top_right_singular_vector

from .conftest import new_library, restored


@pytest.mark.parametrize("tokens, experts, k", [(1, 3, 1), (7, 8, 3), (64, 32, 4), (9, 3, 5)])
def test_every_mixture_strategy_equals_the_token_by_token_sum(tokens, experts, k):
    torch.manual_seed(0)
    x = torch.randn(tokens, 24)
    a = torch.randn(experts, 5, 24)
    b = torch.randn(experts, 16, 5)
    if k <= experts:
        top = torch.randn(tokens, experts).topk(k, dim=-1)
        weights, indices = torch.softmax(top.values, -1), top.indices
    else:  # k > E: some expert is named twice in a token's list, and counts twice
        weights, indices = torch.rand(tokens, k), torch.randint(experts, (tokens, k))
    expected = torch.zeros(tokens, 16)
    for t in range(tokens):
        for j in range(k):
            e = indices[t, j]
            expected[t] += weights[t, j] * (b[e] @ (a[e] @ x[t]))
    b_rows = b.permute(0, 2, 1).reshape(experts * 5, 16)  # row e*R + j: column j of B_e
    h = x @ a.reshape(experts * 5, 24).T  # what the layer passes when it fused the A side
    for name, mixture in MIXTURES.items():
        for precomputed in (None, h):
            mixed = mixture(x, weights, indices, a, b_rows, precomputed)
            torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-4, msg=name)
    strategy = MixtureStrategy().choose(tokens, a, 16, k, x.dtype,
                                        lambda: (x, weights, indices, a, b_rows))
    assert strategy in MIXTURES


def test_every_mixture_strategy_gives_the_same_gradients():
    """PHATGOOSE trains gates through the mixture, whichever strategy the layer chose."""
    torch.manual_seed(0)
    a, b_rows = torch.randn(6, 3, 10), torch.randn(18, 7)
    top = torch.randn(5, 6).topk(2, dim=-1)
    grads = {}
    for name, mixture in MIXTURES.items():
        x = torch.randn(5, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
        weights = torch.softmax(top.values, -1).requires_grad_()
        mixture(x, weights, top.indices, a, b_rows).square().sum().backward()
        grads[name] = (x.grad, weights.grad)
    for name, (x_grad, weights_grad) in grads.items():
        torch.testing.assert_close(x_grad, grads["dense"][0], msg=name)
        torch.testing.assert_close(weights_grad, grads["dense"][1], msg=name)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_prototype_is_the_top_right_singular_vector_of_the_dense_update(rank):
    torch.manual_seed(rank)
    a, b = torch.randn(rank, 40), torch.randn(30, rank)
    _, _, vh = torch.linalg.svd((b @ a).double())
    p = top_right_singular_vector(a, b).double()
    assert torch.isclose(p.norm(), torch.tensor(1.0, dtype=torch.float64))
    assert abs(p @ vh[0]) == pytest.approx(1.0, abs=1e-6)  # equal up to sign


def _dominant_lora(out_dim, in_dim, rank, seed):
    """Factors of an update with singular values 8, 1, 0.5, ... (power iteration converges)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_dim, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_dim, rank, generator=g))
    s = torch.tensor([8.0] + [1.0 / (i + 1) for i in range(rank - 1)])
    return (s.sqrt()[:, None] * v.T), u * s.sqrt()  # A (r, in), B (out, r)


def _synthetic_peft_folders(model, tmp_path, n, rank=4, targets=("q_proj", "v_proj", "up_proj")):
    """`n` PEFT LoRA folders of `model` with dominant singular directions (tiny left as found)."""
    folders = []
    for e in range(n):
        with restored(model):
            peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=8,
                                                          target_modules=list(targets)))
            with torch.no_grad():
                for name, module in peft_model.named_modules():
                    if hasattr(module, "lora_A") and "default" in module.lora_A:
                        a, b = _dominant_lora(module.out_features, module.in_features, rank,
                                              seed=zlib.crc32(f"{e}:{name}".encode()))
                        module.lora_A["default"].weight.copy_(a / 4)
                        module.lora_B["default"].weight.copy_(b)
            peft_model.save_pretrained(str(tmp_path / f"e{e}"))
            peft_model.unload()
        folders.append(tmp_path / f"e{e}")
    return folders


@pytest.mark.parametrize("top_k, temperature", [(1, 1.0), (3, 0.5)])
def test_arrow_matches_peft_create_arrow_model(tiny, tmp_path, top_k, temperature):
    model, tokenizer = tiny
    folders = _synthetic_peft_folders(model, tmp_path, n=6)
    library = new_library(tmp_path / "lib", model)
    for i, folder in enumerate(folders):
        library.import_peft(str(folder), f"e{i}")
    ids = tokenizer(["Repeat: apple 3\nAnswer:", "The capital of France"], return_tensors="pt",
                    padding=True)
    base, _ = quiver.load_base("tiny-llama", device="cpu")
    peft_arrow = create_arrow_model(base, [str(f) for f in folders],
                                    ArrowConfig(top_k=top_k, router_temperature=temperature,
                                                rng_seed=0))
    expected = peft_arrow(**ids).logits
    routed = quiver.reuse(model, library, method="arrow", top_k=top_k, temperature=temperature)
    try:
        got = routed(**ids).logits
    finally:
        detach_experts(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["sparse", "dense"])
def test_sibling_layers_share_one_pass_over_their_input(tiny, tmp_path, strategy):
    model, tokenizer = tiny
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
    library = new_library(tmp_path / "lib", model)
    for i, folder in enumerate(_synthetic_peft_folders(model, tmp_path, 5, targets=targets)):
        library.import_peft(str(folder), f"e{i}")
    ids = tokenizer("The capital of France", return_tensors="pt").input_ids
    routed = quiver.reuse(model, library, method="arrow", top_k=2, mixture=strategy)
    try:
        layers = routed.quiver_routing.layers
        groups = {id(layer._shared[0]): layer._shared[0] for layer in layers}
        attention = [layer for layer in layers if ".self_attn." in layer.name][:4]
        assert len({id(layer._shared[0]) for layer in attention[:3]}) == 1  # q, k, v
        assert attention[3]._shared[0] is not attention[0]._shared[0]  # o_proj alone
        with torch.no_grad():
            shared = routed(ids).logits
            assert all(group.passes == 1 for group in groups.values())
            assert len(groups) == 3 * 2  # per block: q/k/v, o, gate/up
            for layer in layers:
                layer._shared = None  # every layer on its own
            alone = routed(ids).logits
    finally:
        detach_experts(model)
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)


def test_uniform_routing_equals_the_folded_average_update(tiny, tiny_library):
    model, tokenizer = tiny
    ids = tokenizer("Repeat: river 5\nAnswer:", return_tensors="pt").input_ids
    reference, _ = quiver.load_base("tiny-llama", device="cpu")
    experts = tiny_library.experts()
    with torch.no_grad():
        for expert in experts:
            for module, (a, b) in expert.lora_factors().items():
                reference.get_submodule(module).weight += expert.scaling * (b @ a) / len(experts)
    routed = quiver.reuse(model, tiny_library, method="uniform")
    try:
        torch.testing.assert_close(routed(ids).logits, reference(ids).logits, rtol=1e-4,
                                   atol=1e-4)
    finally:
        detach_experts(model)
    assert not any("Routed" in type(m).__name__ for m in model.modules())


def test_experts_with_different_ranks_and_modules_route_together(tiny, tmp_path):
    model, tokenizer = tiny
    library = new_library(tmp_path / "lib", model)
    specs = [(2, ("q_proj", "v_proj")), (6, ("q_proj", "down_proj")), (4, ("v_proj",))]
    for i, (rank, targets) in enumerate(specs):
        folder = _synthetic_peft_folders(model, tmp_path / f"s{i}", n=1, rank=rank,
                                         targets=targets)[0]
        library.import_peft(str(folder), f"x{i}")
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    routed = quiver.reuse(model, library, method="arrow", top_k=1)
    try:
        q = routed.get_submodule("model.layers.0.self_attn.q_proj")
        assert q.a_stack.shape == (2, 6, 64)  # two experts, padded to rank 6
        assert routed.get_submodule("model.layers.0.mlp.down_proj").a_stack.shape[0] == 1
        logits = routed(ids).logits
    finally:
        detach_experts(model)
    assert torch.isfinite(logits).all()


def test_generate_with_cache_matches_generate_without(tiny, tiny_library):
    model, tokenizer = tiny
    tokenizer.padding_side = "left"
    ids = tokenizer(["Repeat: apple 1\nAnswer:", "Repeat: stone"], return_tensors="pt",
                    padding=True)
    routed = quiver.reuse(model, tiny_library, method="arrow", top_k=1)
    try:
        cached = routed.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = routed.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=False)
    finally:
        detach_experts(model)
        tokenizer.padding_side = "right"
    assert torch.equal(cached, uncached)


def test_experts_of_another_base_model_are_refused(tiny, tiny_library):
    model, _ = tiny
    other, _ = quiver.load_base("tiny-llama", device="cpu")
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    with pytest.raises(QuiverError, match="fingerprint"):
        quiver.reuse(other, tiny_library)
    with pytest.raises(QuiverError, match="unknown routing method"):
        quiver.reuse(model, tiny_library, method="telepathy")


def test_prototypes_are_computed_once_per_expert(tiny, tiny_library, tmp_path, monkeypatch):
    from quiver.transforms import arrow

    library = new_library(tmp_path / "lib", tiny[0])
    for name in tiny_library.names():
        library.add(tiny_library.get(name))
    first = arrow.library_prototypes(library, ["alpha"])
    assert library.get_derived("alpha", arrow.KIND, {"method": "qr-svd"}) is not None
    assert library.get_derived("beta", arrow.KIND, {"method": "qr-svd"}) is None

    def no_recompute(factors):
        raise AssertionError("prototypes were computed again")

    monkeypatch.setattr(arrow, "expert_prototypes", no_recompute)
    again = arrow.library_prototypes(library, ["alpha"])
    for module in first["alpha"]:
        assert torch.equal(first["alpha"][module], again["alpha"][module])
    assert len(first["alpha"]) == 14




def test_genknowsub_subtracts_the_mean_general_update_in_update_space(tiny, tiny_library):
    model, tokenizer = tiny
    ids = tokenizer("Repeat: cloud 4\nAnswer:", return_tensors="pt").input_ids
    reference, _ = quiver.load_base("tiny-llama", device="cpu")
    task, general = tiny_library.get("alpha"), tiny_library.get("beta")
    with torch.no_grad():
        for module, (a, b) in task.lora_factors().items():
            reference.get_submodule(module).weight += task.scaling * b @ a
        for module, (a, b) in general.lora_factors().items():
            reference.get_submodule(module).weight -= general.scaling * b @ a
    routed = quiver.reuse(model, tiny_library, method="arrow", experts=["alpha"],
                          general=["beta"], top_k=1)
    try:
        torch.testing.assert_close(routed(ids).logits, reference(ids).logits, rtol=1e-4,
                                   atol=1e-4)
    finally:
        detach_experts(model)
    with pytest.raises(QuiverError, match="Arrow routing only"):
        quiver.reuse(model, tiny_library, method="uniform", general=["beta"])


# ------------------------------------------------------------------------------- SpectR
def test_spectr_logits_are_the_norm_of_each_expert_s_update_of_the_token():
    """||s B A x|| from the factors and the Gram matrices equals ||dW x|| with dW formed
    densely, and ||S V^T x|| from dW's SVD (the paper's form)."""
    from quiver.routing.spectr import SpectrRouter, update_grams

    generator = torch.Generator().manual_seed(0)
    n_experts, rank, fan_in, fan_out, tokens = 5, 4, 24, 16, 7
    a = torch.randn(n_experts, rank, fan_in, generator=generator, dtype=torch.float64)
    sb = torch.randn(n_experts, fan_out, rank, generator=generator, dtype=torch.float64)
    b_rows = sb.transpose(1, 2).reshape(n_experts * rank, fan_out)  # the layer's layout
    x = torch.randn(tokens, fan_in, generator=generator, dtype=torch.float64)
    router = SpectrRouter(top_k=n_experts, temperature=0.5)
    weights, indices = router(x, a, update_grams(b_rows, n_experts))
    dense = torch.stack([(sb[e] @ a[e] @ x.T).norm(dim=0) for e in range(n_experts)], 1)
    spectral = []
    for e in range(n_experts):
        _, s, vh = torch.linalg.svd(sb[e] @ a[e], full_matrices=False)
        spectral.append((s[:, None] * (vh @ x.T)).norm(dim=0))  # ||S V^T x||
    torch.testing.assert_close(torch.stack(spectral, 1), dense)
    expected = torch.softmax(dense / 0.5, dim=-1)
    got = torch.zeros_like(expected).scatter(1, indices, weights)
    torch.testing.assert_close(got, expected)


def test_spectr_routes_planted_tokens_where_arrow_sees_only_the_top_direction():
    """Expert 0 changes two directions almost equally (e1 a little more than e2), expert 1
    one direction (e3). Tokens along e2 belong to expert 0: SpectR, which sees the whole
    spectrum, sends them there; Arrow, which sees only the top singular vector (e1), cannot
    tell expert 0 from expert 1 on them (both overlaps are 0)."""
    from quiver.routing.spectr import SpectrRouter, update_grams
    from quiver.transforms.arrow import top_right_singular_vector

    fan_in = 8
    eye = torch.eye(fan_in, dtype=torch.float64)
    a = torch.zeros(2, 2, fan_in, dtype=torch.float64)
    sb = torch.zeros(2, fan_in, 2, dtype=torch.float64)
    a[0, 0], a[0, 1], sb[0, 0, 0], sb[0, 1, 1] = eye[0], eye[1], 1.0, 0.9  # e1 > e2
    a[1, 0], sb[1, 2, 0] = eye[2], 1.0  # e3 only
    b_rows = sb.transpose(1, 2).reshape(4, fan_in)
    tokens = torch.stack([eye[1] * c for c in (0.5, 1.0, 2.0)])  # along e2: expert 0's
    _, spectr = SpectrRouter(top_k=1)(tokens, a, update_grams(b_rows, 2))
    assert spectr.flatten().tolist() == [0, 0, 0]
    prototypes = torch.stack([top_right_singular_vector(a[e], sb[e]) for e in range(2)])
    projections = tokens @ prototypes.T
    assert projections.abs().max() < 1e-12  # Arrow: no signal at all on these tokens


def test_spectr_routes_a_real_model_with_the_layer_s_own_factors(tiny, tiny_library):
    """quiver.reuse(method="spectr"): every routed layer's Grams are (s B)^T (s B) of its
    experts, and its top-1 choice on a token is the expert whose update moves it most."""
    model, tokenizer = tiny
    ids = tokenizer("Repeat: apple 3\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
    routed = quiver.reuse(model, tiny_library, method="spectr", top_k=1)
    seen = {}
    layer = routed.get_submodule("model.layers.1.mlp.down_proj")
    hook = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            logits = routed(ids).logits
            x = seen["x"].reshape(-1, layer.in_features)
            weights, indices = routed.quiver_routing.route(layer, x)
    finally:
        hook.remove()
        detach_experts(model)
    factors = {n: tiny_library.get(n).lora_factors()["model.layers.1.mlp.down_proj"]
               for n in ("alpha", "beta")}
    scale = tiny_library.get("alpha").scaling
    norms = torch.stack([(scale * b @ a @ x.T).norm(dim=0) for a, b in factors.values()], 1)
    assert indices.flatten().tolist() == norms.argmax(dim=1).tolist()
    assert torch.all(weights == 1.0) and not torch.allclose(logits, base)


def test_recording_routing_counts_choices_or_sums_routing_weight(tiny, tiny_library):
    """Per layer, k choices per token, and routing weights that sum to 1 per token."""
    from quiver.zero_shot import recording_routing

    model, tokenizer = tiny
    ids = tokenizer("Repeat: apple 3\nAnswer:", return_tensors="pt").input_ids
    routed = quiver.reuse(model, tiny_library, method="arrow", top_k=2)
    try:
        with torch.no_grad(), recording_routing(routed) as counts:
            routed(ids)
        with torch.no_grad(), recording_routing(routed, weighted=True) as weights:
            routed(ids)
    finally:
        detach_experts(model)
    tokens = ids.shape[1]
    assert all(int(c.sum()) == 2 * tokens for c in counts.values())
    for layer, mass in weights.items():
        assert mass.dtype == torch.float64 and float(mass.sum()) == pytest.approx(tokens)
        assert ((mass > 0) == (counts[layer] > 0)).all()
