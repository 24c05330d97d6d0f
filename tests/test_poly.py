"""Poly and MHR (`quiver.adapters.poly_mhr`): the layer's formula, PEFT's Poly as the
reference, joint training with its own routing learning rate, resuming, `quiver build
--strategy poly|mhr`, evaluation by routing row, and the commands that refuse the kind."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from quiver.adapters import PolyMHRConfig, attach_poly, load_poly, routing_weights
from quiver.adapters.poly_mhr import PolyLinear, TaskRouting
from quiver.adapters.task_rows import task_routing
from quiver.build import BuildConfig, build_library
from quiver.errors import QuiverError
from quiver.library import Expert, ExpertInfo, Library
from quiver.models import fingerprint, load_base

from .conftest import (
    QUICK,
    check_an_interrupted_build_resumes,
    check_an_interrupted_training_resumes,
    jsonl_tasks,
    make_task,
    new_library,
    train_jointly,
)

SPEC = PolyMHRConfig(skills=3, heads=4)
FAST = dataclasses.replace(QUICK, steps=4, eval_every=2)


def randomise(layers, seed: int = 0) -> None:
    """Random skills and logits (B starts at zero, which would make any comparison trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for param in (layer.lora_a, layer.lora_b, layer.logits):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


# ----------------------------------------------------------------------- the formula
def test_routing_is_sampled_while_training_and_a_normalised_sigmoid_at_evaluation():
    logits = torch.randn(5, 4, 3, requires_grad=True)  # (rows, H, S)
    probs = torch.sigmoid(logits)
    torch.testing.assert_close(routing_weights(logits, training=False),
                               probs / probs.sum(-1, keepdim=True))
    torch.manual_seed(0)
    first, second = routing_weights(logits, True), routing_weights(logits, True)
    assert not torch.allclose(first, second)  # relaxed Bernoulli samples
    torch.testing.assert_close(first.sum(-1), torch.ones(5, 4))  # normalised per head
    first[..., 0].sum().backward()
    assert logits.grad.abs().sum() > 0  # reparameterised: the logits learn through samples


def test_the_layer_computes_the_formula_head_by_head():
    torch.manual_seed(0)
    base, routing = nn.Linear(8, 12, bias=False), TaskRouting()
    layer = PolyLinear(base, n_tasks=2, skills=3, heads=2, rank=2, scaling=0.5, dropout=0.0,
                       routing=routing)
    randomise([layer])
    layer.eval()
    x = torch.randn(2, 5, 8)  # (batch, time, in)
    routing.task_ids = torch.tensor([1, 0])
    out = layer(x)
    for row, task in enumerate([1, 0]):
        w = torch.sigmoid(layer.logits[task].view(2, 3))
        w = w / w.sum(-1, keepdim=True)  # (H, S)
        a = [sum(w[h, s] * layer.lora_a[h, s] for s in range(3)) for h in range(2)]  # (4, r)
        b = [sum(w[h, s] * layer.lora_b[h, s] for s in range(3)) for h in range(2)]  # (r, 6)
        low = sum(x[row][:, 4 * h:4 * h + 4] @ a[h] for h in range(2))  # (time, r)
        expected = base(x[row]) + 0.5 * torch.cat([low @ b[h] for h in range(2)], dim=-1)
        torch.testing.assert_close(out[row], expected)
    routing.task_ids = 0  # one task for the whole batch: the same as that row id per row
    single = layer(x)
    routing.task_ids = torch.tensor([0, 0])
    torch.testing.assert_close(single, layer(x))
    routing.task_ids = None
    with pytest.raises(QuiverError, match="needs the task"):
        layer(x)


def test_heads_that_do_not_divide_a_layer_are_refused_and_leave_the_model_as_found(tiny):
    with pytest.raises(QuiverError, match="5 heads do not divide"):
        PolyLinear(nn.Linear(8, 12), 1, 2, 5, 2, 1.0, 0.0, TaskRouting())
    model, _ = tiny
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(QuiverError, match="3 heads do not divide"):
        attach_poly(model, ["t"], PolyMHRConfig(skills=2, heads=3), 2, 4.0, 0.0, ("q_proj",))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(isinstance(m, PolyLinear) for m in model.modules())
    assert task_routing(model) is None


# ------------------------------------------------------------------ PEFT reference
@pytest.mark.parametrize("heads", [1, 4])
def test_peft_poly_gives_the_same_outputs_for_the_same_weights_and_task_ids(tiny, tmp_path,
                                                                            heads):
    from peft import PeftModel

    model, tokenizer = tiny
    torch.manual_seed(0)
    tasks = ["t0", "t1", "t2"]
    adapter = attach_poly(model, tasks, PolyMHRConfig(skills=3, heads=heads), rank=2, alpha=16,
                          dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    batch = tokenizer(["Repeat: apple 1\nAnswer:", "Hello there, friends"], return_tensors="pt",
                      padding=True)
    task_ids = torch.tensor([2, 0])
    try:
        randomise(adapter.layers.values())
        adapter.eval()
        adapter.routing.task_ids = task_ids
        with torch.no_grad():
            as_trained = model(**batch).logits  # scaling alpha / r, B as trained
        config, weights, lora = adapter.stored(adapter.weights())
    finally:
        adapter.remove()
    info = ExpertInfo(name="mhr", tasks=tasks, base_model="tiny-llama",
                      base_fingerprint=fingerprint(model), lora=lora, kind="poly")
    library = new_library(tmp_path / "lib", model)
    library.add(Expert(info, config, weights=weights))
    library.export_peft("mhr", str(tmp_path / "peft"))

    poly = load_poly(model, library.get("mhr"))  # the stored form: PEFT's scaling 1 / r
    try:
        poly.routing.task_ids = task_ids
        with torch.no_grad():
            ours = model(**batch).logits
    finally:
        poly.remove()
    with torch.no_grad():
        bare = model(**batch).logits
    fresh, _ = load_base("tiny-llama", device="cpu")
    assert fingerprint(fresh) == fingerprint(model)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = peft_model(**batch, task_ids=task_ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, as_trained, rtol=1e-5, atol=1e-5)
    assert (ours - bare).abs().max() > 0.1  # the adapter does change the outputs


# ------------------------------------------------------------------------- training
def test_joint_training_learns_a_routing_row_per_task_at_its_own_rate(tiny):
    expert = train_jointly(tiny, "mhr", SPEC, PolyLinear)
    assert expert.info.kind == "poly" and expert.info.tasks == ["toy:a", "toy:b"]
    assert expert.info.lora["task_rows"] == ["toy:a", "toy:b"]
    assert expert.info.lora["heads"] == 4 and expert.info.lora["skills"] == 3
    assert expert.adapter_config["peft_type"] == "POLY"
    assert expert.adapter_config["n_splits"] == 4 and expert.adapter_config["n_tasks"] == 2
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tuple(expert.weights[f"{key}.poly_lora_A"].shape) == (4, 3, 16, 4)  # in 64 / H
    assert tuple(expert.weights[f"{key}.poly_lora_B"].shape) == (4, 3, 4, 16)
    logits = expert.weights[f"{key}.poly_router.module_logits"]  # (tasks, H * S)
    # init is U(+-1e-3); both rows moved far more than lr 1e-3 could in 6 steps: each row got
    # gradients from its own task's examples, at the routing rate 0.1
    assert logits.abs().min(dim=1).values.gt(1e-3).all() and logits.abs().max() > 0.05
    assert not torch.equal(logits[0], logits[1])


def test_an_interrupted_poly_training_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    check_an_interrupted_training_resumes(tiny, tmp_path, monkeypatch, SPEC,
                                          PolyMHRConfig(skills=2, heads=4), PolyLinear,
                                          steps=8, eval_every=3, crash=7)


# ---------------------------------------------------------- build, evaluate, refuse
def test_mhr_build_is_one_entry_evaluated_by_routing_row_and_refused_by_lora_methods(
        tmp_path, monkeypatch):
    from quiver.adapters import PolyAdapter
    from quiver.recipes import evaluate_method

    tasks = jsonl_tasks(tmp_path / "tasks")
    lib = str(tmp_path / "lib")
    build = BuildConfig(strategy="mhr", workers=1)
    report = build_library(tasks, lib, "tiny-llama", FAST, build, show_progress=False,
                           adapter=SPEC)
    assert [(o.name, o.status) for o in report.outcomes] == [("mhr", "trained")]
    library = Library(lib)
    assert library.names() == ["mhr"] and library.get("mhr").info.tasks == tasks
    again = build_library(tasks, lib, "tiny-llama", FAST, build, show_progress=False,
                          adapter=SPEC)
    assert [o.status for o in again.outcomes] == ["skipped"]
    with pytest.raises(QuiverError, match="made otherwise"):  # not silently kept as if equal
        build_library(tasks, lib, "tiny-llama", FAST, build, show_progress=False,
                      adapter=PolyMHRConfig(skills=2, heads=4))

    model_and_tokenizer = load_base("tiny-llama", device="cpu")
    rows, set_task = [], PolyAdapter.set_task

    def recording_set_task(self, task):
        set_task(self, task)
        rows.append(self.routing.task_ids)

    monkeypatch.setattr(PolyAdapter, "set_task", recording_set_task)
    result = evaluate_method("expert:mhr", tasks[::-1], lib, "tiny-llama", show_progress=False,
                             model_and_tokenizer=model_and_tokenizer)
    assert set(result["tasks"]) == set(tasks) and "exact_match" in result["average"]
    assert rows == [1, 0]  # each task scored with its own routing row
    assert not any(isinstance(m, PolyLinear) for m in model_and_tokenizer[0].modules())
    other = jsonl_tasks(tmp_path / "other", ("reverse",))
    with pytest.raises(QuiverError, match="no routing row"):
        evaluate_method("expert:mhr", other, lib, "tiny-llama", show_progress=False,
                        model_and_tokenizer=model_and_tokenizer)
    for method in ("arrow", "uniform"):
        with pytest.raises(QuiverError, match=f"poly adapter .* not a LoRA: {method} routing"):
            evaluate_method(method, other, lib, "tiny-llama", show_progress=False,
                            model_and_tokenizer=model_and_tokenizer)
    from quiver.merging import merge_experts
    from quiver.transforms.mbc import MBCConfig, cluster_experts

    with pytest.raises(QuiverError, match="merging needs LoRA experts"):
        merge_experts(library.experts(), "uniform", "avg")
    with pytest.raises(QuiverError, match="MBC clustering needs LoRA experts"):
        cluster_experts(library.experts() * 2, MBCConfig(k=1))


def test_an_interrupted_mhr_build_resumes_where_it_stopped(tiny, tmp_path, monkeypatch):
    check_an_interrupted_build_resumes(tiny, tmp_path, monkeypatch, "mhr", SPEC, FAST)


def test_checkpointing_keeps_the_gradients_of_skills_and_routing(tiny):
    from quiver.data.batching import tokenize_example
    from quiver.training import accumulate_gradients, gradient_checkpointing

    model, tokenizer = tiny
    examples = [tokenize_example(tokenizer, e, 64, task)
                for task in (0, 1) for e in make_task(n=3).examples]
    adapter = attach_poly(model, ["a", "b"], SPEC, 4, 16.0, 0.0, ("q_proj", "down_proj"))
    try:
        randomise(adapter.layers.values())
        grads = []
        for checkpointing in (False, True):
            adapter.train()
            torch.manual_seed(0)  # the same relaxed-Bernoulli samples in both runs
            with gradient_checkpointing(model, checkpointing):
                accumulate_gradients(model, examples, tokenizer.pad_token_id,
                                     route=adapter.routed)
            layer = adapter.layers["model.layers.1.mlp.down_proj"]
            grads.append([p.grad.clone() for p in (layer.lora_a, layer.logits)])
            for p in (p for layer in adapter.layers.values() for p in layer.parameters()):
                p.grad = None
    finally:
        adapter.remove()
    for plain, checkpointed in zip(*grads, strict=True):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"strategy": "poly"}, "poly has one routing head, not 4"),
    ({"strategy": "mhr"}, "7 heads do not divide"),
])
def test_bad_heads_are_refused_before_anything_is_written(tmp_path, options, message):
    tasks = jsonl_tasks(tmp_path / "tasks")
    heads = 7 if "7" in message else 4
    with pytest.raises(QuiverError, match=message):
        build_library(tasks, str(tmp_path / "lib"), "tiny-llama", FAST, BuildConfig(**options),
                      show_progress=False, adapter=PolyMHRConfig(skills=2, heads=heads))
    assert not (tmp_path / "lib").exists()


def test_a_poly_peft_folder_cannot_be_imported_as_a_lora(tiny, tmp_path):
    model, _ = tiny
    adapter = attach_poly(model, ["t"], PolyMHRConfig(skills=2), 2, 4.0, 0.0, ("q_proj",))
    try:
        config, weights, lora = adapter.stored(adapter.weights())
    finally:
        adapter.remove()
    library = new_library(tmp_path / "lib", model)
    info = ExpertInfo(name="p", tasks=["t"], base_model="tiny-llama", base_fingerprint=None,
                      lora=lora)  # kind left at "lora": the config says POLY
    with pytest.raises(QuiverError, match="of kind 'lora' has a POLY adapter config"):
        library.add(Expert(info, config, weights=weights))
    library.add(Expert(dataclasses.replace(info, kind="poly"), config, weights=weights))
    library.export_peft("p", str(tmp_path / "peft"))
    with pytest.raises(QuiverError, match="is a POLY adapter: only LoRA adapters"):
        library.import_peft(str(tmp_path / "peft"), "again")


def test_build_ls_eval_and_a_refusal_from_the_command_line(tmp_path):
    tasks_file = tmp_path / "train.txt"
    tasks_file.write_text("\n".join(jsonl_tasks(tmp_path / "tasks")))
    lib = tmp_path / "lib"
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def quiver(*args):
        return subprocess.run([sys.executable, "-m", "quiver.cli", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=300)

    done = quiver("build", "--strategy", "mhr", "--skills", 3, "--heads", 4, "--tasks-file",
                  tasks_file, "--library", lib, "--base", "tiny-llama", "--steps", 2,
                  "--eval-every", 2, "--batch-size", 4, "--workers", 1, "--quiet")
    assert done.returncode == 0, done.stderr
    assert "mhr library" in done.stdout and "trained" in done.stdout
    listing = quiver("library", "ls", lib)
    assert "mhr (S=3, H=4)" in listing.stdout, listing.stdout
    scored = quiver("eval", "--method", "expert:mhr", "--library", lib, "--base", "tiny-llama",
                    "--tasks-file", tasks_file, "--limit", 2)
    assert scored.returncode == 0, scored.stderr
    assert "copy" in scored.stdout and "upper" in scored.stdout
    merged = quiver("merge", lib, "--method", "uniform", "--name", "avg")
    assert merged.returncode == 2 and "Traceback" not in merged.stderr
    assert "is a poly adapter" in merged.stderr and len(merged.stderr.strip().splitlines()) <= 2
