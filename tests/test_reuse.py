"""Zero-shot reuse end to end on the tiny model: every router, the oracle, the eval recipe."""

import json

import pytest
import torch

import quiver
from quiver.errors import QuiverError
from quiver.evaluation import EvalConfig
from quiver.recipes import evaluate_method
from quiver.routing import RoutedLinear, detach_experts
from quiver.training import train_expert
from quiver.zero_shot import routing_context

from .conftest import QUICK, new_library


def _jsonl_task(path, word, n=40):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Say {word} {i}:", "target": f" {word} {i}"}) + "\n")
    return f"jsonl:{path}"


@pytest.fixture(scope="module")
def task_library(tiny, tmp_path_factory):
    """Two tiny experts trained on two JSONL tasks that `load_task` can read back."""
    model, tokenizer = tiny
    root = tmp_path_factory.mktemp("reuse")
    library = new_library(root / "lib", model)
    names = {}
    for word in ("apple", "river"):
        task_name = _jsonl_task(root / f"{word}.jsonl", word)
        expert, _ = train_expert(model, tokenizer, [quiver.load_task(task_name)], word, QUICK,
                                 show_progress=False)
        library.add(expert)
        names[word] = task_name
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps({"prompt": f"Q{i}: fruit?\nA: ", "options": ["apple", "no"],
                                      "answer": i % 2}) + "\n" for i in range(30)))
    names["heldout"] = f"jsonl:{mc}"
    return library, names


@pytest.mark.parametrize("method", ["arrow", "uniform", "centroid", "phatgoose"])
def test_every_router_gives_a_working_routed_model(tiny, task_library, method):
    model, tokenizer = tiny
    library, _ = task_library
    ids = tokenizer("Say apple 3:", return_tensors="pt").input_ids
    plain = model(ids).logits
    routed = quiver.reuse(model, library, method=method, tokenizer=tokenizer)
    try:
        assert sum(isinstance(m, RoutedLinear) for m in model.modules()) == 14
        logits = routed(ids).logits
        assert torch.isfinite(logits).all() and not torch.allclose(logits, plain)
    finally:
        detach_experts(model)
    torch.testing.assert_close(model(ids).logits, plain)


def test_learned_keys_are_stored_in_the_library(tiny, task_library):
    from quiver.transforms import centroid, phatgoose

    library, _ = task_library
    quiver.reuse(tiny[0], library, method="centroid", tokenizer=tiny[1])
    detach_experts(tiny[0])
    stored = library.get_derived("apple", centroid.KIND, {"examples": 10, "split": "train"})
    assert stored is not None
    for vector in stored[0].values():
        assert vector.norm().item() == pytest.approx(1.0, abs=1e-5)
    quiver.reuse(tiny[0], library, method="phatgoose", tokenizer=tiny[1])
    detach_experts(tiny[0])
    gates = library.get_derived("river", phatgoose.KIND, phatgoose.gate_config())[0]
    assert len(gates) == 14 and any(g.abs().sum() > 0 for g in gates.values())


def test_phatgoose_gate_training_leaves_the_base_frozen(tiny, task_library):
    from quiver.transforms.phatgoose import train_gates

    model, tokenizer = tiny
    library, names = task_library
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_gates(model, tokenizer, library.get("apple"), [quiver.load_task(names["apple"])],
                steps=3)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]) and parameter.grad is None


def test_routing_counts_report_which_experts_were_chosen(tiny, task_library):
    model, tokenizer = tiny
    library, _ = task_library
    quiver.reuse(model, library, method="arrow", top_k=1)
    context = routing_context(model)
    context.counts = {layer.name: torch.zeros(2, dtype=torch.long) for layer in context.layers}
    try:
        model(tokenizer("Say river 2:", return_tensors="pt").input_ids)
    finally:
        detach_experts(model)
    n_tokens = len(tokenizer("Say river 2:")["input_ids"])
    assert all(c.sum().item() == n_tokens for c in context.counts.values())


def test_evaluation_is_zero_shot_unless_allowed(tiny, task_library):
    library, names = task_library
    config = EvalConfig(limit=2, max_new_tokens=4)
    with pytest.raises(QuiverError, match="not zero-shot"):
        evaluate_method("arrow", [names["apple"]], library.url, "tiny-llama", config,
                        model_and_tokenizer=tiny, show_progress=False)
    report = evaluate_method("arrow", [names["apple"]], library.url, "tiny-llama", config,
                             allow_seen=True, model_and_tokenizer=tiny, show_progress=False)
    assert report["experts"] == ["apple", "river"] and report["method"] == "arrow"
    held_out = evaluate_method("uniform", [names["heldout"]], library.url, "tiny-llama",
                               config, model_and_tokenizer=tiny, show_progress=False)
    assert held_out["tasks"][names["heldout"]]["examples"] == 2
    every = EvalConfig(split="all", limit=0, max_new_tokens=4)
    with pytest.raises(QuiverError, match="not zero-shot"):  # all examples: training ones too
        evaluate_method("arrow", [names["apple"]], library.url, "tiny-llama", every,
                        model_and_tokenizer=tiny, show_progress=False)
    whole = evaluate_method("uniform", [names["heldout"]], library.url, "tiny-llama", every,
                            model_and_tokenizer=tiny, show_progress=False)
    task = quiver.load_task(names["heldout"])
    assert whole["tasks"][names["heldout"]]["examples"] == len(task.examples)
    assert not any(isinstance(m, RoutedLinear) for m in tiny[0].modules())


def test_oracle_routes_each_task_to_its_own_expert(tiny, task_library):
    library, names = task_library
    config = EvalConfig(limit=3, max_new_tokens=4)
    oracle = evaluate_method("oracle", [names["apple"], names["river"]], library.url,
                             "tiny-llama", config, model_and_tokenizer=tiny, show_progress=False)
    for word in ("apple", "river"):
        single = evaluate_method(f"expert:{word}", [names[word]], library.url, "tiny-llama",
                                 config, allow_seen=True, model_and_tokenizer=tiny,
                                 show_progress=False)
        assert oracle["tasks"][names[word]] == single["tasks"][names[word]]
    with pytest.raises(QuiverError, match="oracle: no expert"):
        evaluate_method("oracle", [names["heldout"]], library.url, "tiny-llama", config,
                        model_and_tokenizer=tiny, show_progress=False)
