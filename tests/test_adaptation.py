"""Few-shot adaptation (`quiver.adaptation`, `quiver adapt`): each method adds an entry with
its provenance and starts where its docstring says; frozen parts stay bit-identical; LoraHub's
weights come from its search; bad input adds nothing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from quiver.adaptation import (
    AdaptConfig,
    adapt_task,
    combine,
    few_shot_task,
    lib_mu_factors,
    mhr_mu_factors,
    stack_experts,
)
from quiver.adaptation.lorahub import search_weights
from quiver.adaptation.starts import LoraStart
from quiver.adapters import PolyMHRConfig, load_poly
from quiver.build import train_into_library
from quiver.config import from_dict, to_dict
from quiver.data import load_task
from quiver.errors import QuiverError
from quiver.evaluation import EvalConfig
from quiver.library import Expert, Library
from quiver.library.expert import PEFT_PREFIX
from quiver.models import fingerprint, linear_module_shapes
from quiver.recipes import evaluate_method
from quiver.training import TrainConfig

from .conftest import QUICK, jsonl_tasks, run_cli, write_task

FAST = dataclasses.replace(QUICK, steps=4, eval_every=2)
STILL = dataclasses.replace(FAST, lr=0.0)  # lr 0: the result is the starting point
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """Tasks copy, upper (seen by the sources) and reverse (the new task); `lib` holds an MHR
    entry 'mhr' (S = 3, H = 4) trained on copy and upper; `experts` holds LoRA experts
    'copy' and 'upper'."""
    root = tmp_path_factory.mktemp("adapt")
    copy, upper, reverse = jsonl_tasks(root / "tasks", ("copy", "upper", "reverse"))
    lib, experts = str(root / "lib"), str(root / "experts")
    train_into_library([copy, upper], lib, "mhr", "tiny-llama", FAST, show_progress=False,
                       model_and_tokenizer=tiny, adapter=PolyMHRConfig(skills=3, heads=4))
    for task, name in ((copy, "copy"), (upper, "upper")):
        train_into_library([task], experts, name, "tiny-llama", FAST, show_progress=False,
                           model_and_tokenizer=tiny)
    return {"root": root, "lib": lib, "experts": experts, "new": reverse, "seen": copy}


def adapt(setup, tiny, name, method, source="", shots=8, train=FAST, task="new", **options):
    return adapt_task(setup[task], setup["lib"], name,
                      AdaptConfig(method=method, shots=shots, source=source, **options),
                      train, show_progress=False, model_and_tokenizer=tiny)


def update(expert) -> dict[str, torch.Tensor]:
    """A LoRA expert's update s B A per module."""
    return {m: expert.scaling * b.double() @ a.double()
            for m, (a, b) in expert.lora_factors().items()}


def check_provenance(expert, setup, method, source, shots=8, task="new"):
    info = expert.info
    assert info.tasks == [load_task(setup[task]).name] and info.source == f"adapt:{method}"
    adaptation = info.training["adaptation"]
    assert (adaptation["method"], adaptation["source"], adaptation["shots"],
            adaptation["seed"]) == (method, source, shots, 0)
    assert Library(setup["lib"]).get(expert.name).info.content_hash == info.content_hash


# -------------------------------------------------------------------------- options
def test_the_config_round_trips_json_and_refuses_unknown_methods():
    config = AdaptConfig(method="lorahub", shots=5, source="./lib", lorahub_budget=7)
    assert from_dict(AdaptConfig, to_dict(config)) == config
    assert (config.lorahub_l1, config.lorahub_bound) == (0.05, 1.5)  # LoraHub's defaults
    with pytest.raises(QuiverError, match="unknown method 'mhr-y'"):
        from_dict(AdaptConfig, {"method": "mhr-y", "shots": 4})


def test_the_shots_are_a_seeded_nested_sample_of_the_training_split(setup):
    task = load_task(setup["new"])
    train = task.split("train")
    small, large = few_shot_task(task, 4, seed=0), few_shot_task(task, 16, seed=0)
    assert small.split("train") == large.split("train")[:4]  # 4 shots are among the 16
    assert all(e in train for e in large.split("train")) and len(large.split("train")) == 16
    assert few_shot_task(task, 4, seed=1).split("train") != small.split("train")
    assert small.split("valid") == task.split("valid")  # validation and test unchanged
    assert small.split("test") == task.split("test")
    with pytest.raises(QuiverError, match=f"has {len(train)} training examples, fewer than"):
        few_shot_task(task, len(train) + 1, seed=0)


# -------------------------------------------------------------------------- methods
def test_private_adds_a_new_lora_with_its_provenance(setup, tiny):
    expert = adapt(setup, tiny, "private", "private")
    check_provenance(expert, setup, "private", "")
    assert expert.info.kind == "lora" and expert.info.training["train_examples"] == 8
    assert any(b.abs().max() > 0 for _, b in expert.lora_factors().values())  # B left 0


@pytest.mark.parametrize("method", ["mhr-z", "mhr-full"])
def test_mhr_z_trains_only_the_new_row_and_mhr_full_the_skills_too(setup, tiny, method):
    source = Library(setup["lib"]).get("mhr")
    expert = adapt(setup, tiny, method, method, source="mhr")
    check_provenance(expert, setup, method, "mhr")
    assert expert.info.kind == "poly" and expert.info.lora["task_rows"] == expert.info.tasks
    assert expert.adapter_config["n_tasks"] == 1 and expert.adapter_config["n_splits"] == 4
    logits = expert.weights[f"{Q}.poly_router.module_logits"]  # (1, H * S), init U(+-1e-3)
    assert logits.shape == (1, 12) and logits.abs().max() > 1e-2  # the row learnt
    skills = [k for k in source.weights if not k.endswith("module_logits")]
    same = [torch.equal(expert.weights[k], source.weights[k]) for k in skills]
    assert all(same) if method == "mhr-z" else not any(same)
    assert Library(setup["lib"]).get("mhr").info.content_hash == source.info.content_hash


def test_mhr_mu_is_the_entry_at_uniform_routing_and_the_lora_starts_there(setup, tiny):
    model, tokenizer = tiny
    source = Library(setup["lib"]).get("mhr")
    factors = mhr_mu_factors(source)  # {module: (A, s B)}
    batch = tokenizer(["reverse: apple 1\nAnswer:"], return_tensors="pt")
    poly = load_poly(model, source)
    try:
        with torch.no_grad():
            for layer in poly.layers.values():
                layer.logits.zero_()  # every routing weight 1/S
            poly.set_task(0)
            uniform = model(**batch).logits
    finally:
        poly.remove()
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in factors}))
    config = TrainConfig(rank=4, alpha=16.0, dropout=0.0, target_modules=targets)
    adapter = LoraStart("mhr-mu", "mhr", "").with_weights(factors).attach(model, ["t"], config)
    try:
        adapter.eval()
        with torch.no_grad():
            averaged = adapter.causal_lm(**batch).logits
    finally:
        adapter.remove()
    torch.testing.assert_close(averaged, uniform, rtol=1e-5, atol=1e-5)

    expert = adapt(setup, tiny, "mhr-mu", "mhr-mu", source="mhr", train=STILL)
    check_provenance(expert, setup, "mhr-mu", "mhr")
    assert expert.info.kind == "lora"
    for module, delta in update(expert).items():
        a, b = factors[module]
        torch.testing.assert_close(delta, b.double() @ a.double())


def test_lib_mu_starts_from_the_average_of_the_factors(setup, tiny):
    experts = Library(setup["experts"]).experts()
    expert = adapt(setup, tiny, "lib-mu", "lib-mu", source=setup["experts"], train=STILL)
    check_provenance(expert, setup, "lib-mu", setup["experts"])
    assert expert.info.training["adaptation"]["experts"] == ["copy", "upper"]
    for module, delta in update(expert).items():
        a = sum(e.lora_factors()[module][0] for e in experts) / 2  # mean A
        b = sum(e.scaling * e.lora_factors()[module][1] for e in experts) / 2  # mean s B
        torch.testing.assert_close(delta, b.double() @ a.double())
    assert lib_mu_factors(experts).keys() == update(expert).keys()
    trained = adapt(setup, tiny, "lib-mu-trained", "lib-mu", source=setup["experts"])
    assert any(not torch.allclose(update(trained)[m], d) for m, d in update(expert).items())


@pytest.mark.parametrize("method", ["polylib", "polylib-full"])
def test_polylib_routes_over_the_experts_frozen_or_trained(setup, tiny, method):
    experts = Library(setup["experts"]).experts()
    expert = adapt(setup, tiny, method, method, source=setup["experts"])
    check_provenance(expert, setup, method, setup["experts"])
    assert expert.info.kind == "poly" and expert.adapter_config["n_skills"] == 2
    assert expert.info.training["adaptation"]["experts"] == ["copy", "upper"]
    logits = expert.weights[f"{Q}.poly_router.module_logits"]
    assert logits.shape == (1, 2) and logits.abs().max() > 1e-2
    rank = expert.adapter_config["r"]
    for module, (a, b) in experts[0].lora_factors().items():
        key = f"{PEFT_PREFIX}{module}"
        skill_a, skill_b = expert.weights[f"{key}.poly_lora_A"][0, 0], expert.weights[
            f"{key}.poly_lora_B"][0, 0]  # skill 0 is expert 'copy'
        frozen = torch.equal(skill_a, a.T) and torch.equal(skill_b, (b * experts[0].scaling).T
                                                           * rank)
        assert frozen if method == "polylib" else not frozen
    assert [e.info.content_hash for e in Library(setup["experts"]).experts()] == [
        e.info.content_hash for e in experts]
    report = evaluate_method(f"expert:{method}", [setup["new"]], setup["lib"], "tiny-llama",
                             EvalConfig(limit=2), show_progress=False, model_and_tokenizer=tiny)
    assert list(report["tasks"]) == [load_task(setup["new"]).name]


def test_the_lorahub_search_starts_at_zero_spends_its_budget_and_frees_its_thread():
    import threading

    import numpy as np

    config = AdaptConfig(method="lorahub", shots=4, lorahub_budget=30)
    threads_before, asked = set(threading.enumerate()), []

    def distance(w):  # a bowl with its bottom at (0.6, -0.3), inside the bounds
        return float(((np.asarray(w) - [0.6, -0.3]) ** 2).sum())

    def bowl(w):
        asked.append(np.array(w))
        return distance(w)

    def threads_left() -> set:  # nevergrad's thread stops when told, not at once
        threading.Event().wait(0.2)
        return set(threading.enumerate()) - threads_before

    search_weights(bowl, 2, config, seed=0)
    assert not threads_left()  # nothing to hold the process at exit
    assert len(asked) == 30 and not asked[0].any()
    assert min(map(distance, asked)) < 1e-3  # found the bottom, not only moved
    assert all(np.abs(w).max() <= 1.5 for w in asked)

    def breaks(w):
        if len(asked) > 33:
            raise RuntimeError("the model failed")
        return bowl(w)

    with pytest.raises(RuntimeError, match="the model failed") as failure:
        search_weights(breaks, 2, config, seed=0)
    assert not threads_left() and failure.traceback  # though the traceback keeps the frames


def test_lorahub_weights_come_from_the_search_and_make_the_stored_lora(setup, tiny):
    # The new task holds the rows of 'copy' under another name, so the search has something
    # to find (on 'reverse', w = 0 can honestly stay the best: it did once on CI).
    setup = {**setup, "copy-again": write_task(setup["root"] / "again" / "copy.jsonl", "copy")}
    experts = Library(setup["experts"]).experts()
    expert = adapt(setup, tiny, "lorahub", "lorahub", source=setup["experts"], shots=4,
                   task="copy-again", lorahub_budget=9, lorahub_l1=1e-4, lorahub_examples=3)
    check_provenance(expert, setup, "lorahub", setup["experts"], shots=4, task="copy-again")
    record = expert.info.training["lorahub"]
    assert len(record["evaluations"]) == 9  # the budget, exactly; the first is w = 0
    assert record["examples"] == 3  # of the 4 shots
    assert record["objective"] == min(record["evaluations"])
    assert record["objective"] < record["evaluations"][0]  # better than the base model
    weights = [record["weights"][e.name] for e in experts]
    assert record["weights"]["copy"] > 0 and all(abs(w) <= 1.5 for w in weights)
    assert record["objective"] == pytest.approx(record["loss"] + 1e-4 * sum(map(abs, weights)))
    valid_loss = expert.info.metrics["best_valid_loss"]  # what `quiver library ls` shows
    assert math.isfinite(valid_loss) and valid_loss > 0
    combined = combine(stack_experts(experts), weights)
    for module, delta in update(expert).items():
        a = sum(w * e.lora_factors()[module][0] for w, e in zip(weights, experts, strict=True))
        b = sum(w * e.scaling * e.lora_factors()[module][1]
                for w, e in zip(weights, experts, strict=True))
        torch.testing.assert_close(delta, b.double() @ a.double())
        torch.testing.assert_close(combined[module][0], a)


# ------------------------------------------------------------------------ bad input
def copy_as(expert, name: str, **changes) -> Expert:
    info = dataclasses.replace(expert.info, name=name, **changes)
    return Expert(info, expert.adapter_config, weights=expert.weights)


@pytest.mark.parametrize("method, source, shots, message", [
    ("private", "", 10_000, "training examples, fewer than the 10000 shots"),
    ("private", "mhr", 4, "private trains a new LoRA from scratch: it takes no --from"),
    ("mhr-z", "", 4, "mhr-z adapts from a source: pass --from"),
    ("mhr-z", "nothing", 4, "no entry 'nothing' in the library"),
    ("mhr-z", "plain", 4, "mhr-z adapts a Poly/MHR entry; 'plain' is a lora adapter"),
    ("mhr-mu", "mhr", 4, "entry 'mhr' was trained on 'jsonl:.*copy.jsonl'"),
    ("polylib", "LIB", 4, "polylib uses a library of LoRA experts; 'mhr'"),
    ("lib-mu", "SEEN", 4, "was trained on 'jsonl:"),
    ("lorahub", "OTHER", 4, "was made for base model"),
])
def test_bad_input_is_refused_and_adds_nothing(setup, tiny, method, source, shots, message):
    model, _ = tiny
    lib = Library(setup["lib"])
    copy = Library(setup["experts"]).get("copy")
    if "plain" not in lib:
        lib.add(copy_as(copy, "plain"))
    if source == "SEEN":  # a library with an expert trained on the new task
        source = str(setup["root"] / "seen")
        if not Library(source, create=True).base:
            train_into_library([setup["new"]], source, "rev", "tiny-llama", FAST,
                               show_progress=False, model_and_tokenizer=tiny)
    if source == "OTHER":  # an expert made for another base model
        source = str(setup["root"] / "other")
        other = Library(source, create=True)
        if not other.base:
            other.ensure_base("another-model", "f00", linear_module_shapes(model))
            for name in ("a", "b"):
                other.add(copy_as(copy, name, base_fingerprint="f00"))
    source = setup["lib"] if source == "LIB" else source
    before = lib.names()
    task = "seen" if message.startswith("entry 'mhr' was trained") else "new"
    with pytest.raises(QuiverError, match=message):
        adapt(setup, tiny, "refused", method, source=source, shots=shots, task=task)
    assert lib.names() == before and "refused" not in lib
    assert fingerprint(model) == fingerprint(tiny[0])


def test_adapt_and_eval_from_the_command_line(setup, tmp_path, monkeypatch, capsys):
    lib = setup["lib"]
    code, out, err = run_cli(monkeypatch, capsys, "adapt", "--task", setup["new"], "--shots", 6,
                             "--method", "mhr-z", "--from", "mhr", "--library", lib, "--name",
                             "cli-mhr-z", "--base", "tiny-llama", "--steps", 2, "--eval-every",
                             2, "--batch-size", 4, "--quiet")
    assert code == 0, err
    assert "added cli-mhr-z" in out and "mhr-z" in out
    info = Library(lib).get("cli-mhr-z").info
    assert info.training["adaptation"]["shots"] == 6 and info.kind == "poly"
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--method", "expert:cli-mhr-z",
                             "--library", lib, "--base", "tiny-llama", "--task", setup["new"],
                             "--limit", 2)
    assert code == 0, err
    assert "reverse" in out
    code, out, err = run_cli(monkeypatch, capsys, "adapt", "--task", setup["new"], "--shots", 4,
                             "--method", "lorahub", "--from", setup["experts"], "--library",
                             lib, "--name", "cli-lorahub", "--lorahub-budget", 3, "--base",
                             "tiny-llama", "--quiet")
    assert code == 0, err
    assert "added cli-lorahub" in out and "a lora entry" in out
    assert len(Library(lib).get("cli-lorahub").info.training["lorahub"]["evaluations"]) == 3
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--method", "expert:cli-lorahub",
                             "--library", lib, "--base", "tiny-llama", "--task", setup["new"],
                             "--limit", 2, "--allow-seen")  # its task: the test split is held out
    assert code == 0, err
    before = Library(lib).names()
    code, _, err = run_cli(monkeypatch, capsys, "adapt", "--task", setup["new"], "--shots", 6,
                           "--method", "mhr-y", "--from", "mhr", "--library", lib, "--name",
                           "bad", "--base", "tiny-llama")
    assert code == 2 and "unknown method 'mhr-y'" in err and len(err.strip().splitlines()) <= 3
    code, _, err = run_cli(monkeypatch, capsys, "adapt", "--task", "jsonl:/no/such.jsonl",
                           "--shots", 6, "--method", "private", "--library", lib, "--name",
                           "bad", "--base", "tiny-llama")
    assert code == 2 and "unknown task" in err
    assert Library(lib).names() == before


def test_an_interrupted_mhr_z_adaptation_resumes_to_the_same_weights(setup, tiny, monkeypatch):
    import quiver.training as training

    config = dataclasses.replace(FAST, batch_size=2)  # 4 steps, saved at step 2
    whole = adapt(setup, tiny, "whole", "mhr-z", source="mhr", train=config, shots=4)
    real = training.loop._lr_factor

    def crash_at_step_3(step, steps, warmup):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, steps, warmup)

    monkeypatch.setattr(training.loop, "_lr_factor", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        adapt(setup, tiny, "resumed", "mhr-z", source="mhr", train=config, shots=4)
    assert "resumed" not in Library(setup["lib"])  # nothing added by a failed run
    assert Library(setup["lib"]).run_state("resumed").read()[1]["step"] == 2
    monkeypatch.setattr(training.loop, "_lr_factor", real)
    resumed = adapt(setup, tiny, "resumed", "mhr-z", source="mhr", train=config, shots=4)
    for key, value in whole.weights.items():
        torch.testing.assert_close(resumed.weights[key], value, rtol=0, atol=0)
    assert Library(setup["lib"]).run_state("resumed").read() is None  # cleared once added
