"""MTL-LoRA (`quiver.adapters.mtl_lora`): the layer's formula and initialisation, gradients
by task row, joint training, resuming, the export of a task as a plain PEFT LoRA with the
same outputs, `quiver build --strategy mtl-lora`, evaluation by task row, and the commands
that refuse the kind."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from quiver.adapters import MTLLoRAConfig, attach_mtl_lora, load_mtl_lora, task_lora
from quiver.adapters.mtl_lora import MTLLoRALinear
from quiver.adapters.task_rows import TaskRouting
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
    run_cli,
    train_jointly,
)

SPEC = MTLLoRAConfig(up_projections=3, mix_temperature=0.5)
FAST = dataclasses.replace(QUICK, steps=4, eval_every=2)
TARGETS = ("q_proj", "v_proj", "down_proj")


def randomise(layers, seed: int = 0) -> None:
    """Random weights everywhere (zero B and identity L would make comparisons trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for param in layer.parts().values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def mtl_entry(model, batch, tasks=("t0", "t1", "t2"), seed=0) -> tuple[Expert, dict]:
    """An MTL-LoRA entry with random weights (as `Library.add` takes it), and the model's
    logits on `batch` for each task, computed by the attached layers."""
    torch.manual_seed(seed)
    adapter = attach_mtl_lora(model, list(tasks), SPEC, rank=2, alpha=8.0, dropout=0.0,
                              target_modules=TARGETS)
    try:
        randomise(adapter.layers.values(), seed)
        adapter.eval()
        logits = {}
        for task in tasks:
            adapter.set_task(task)
            with torch.no_grad():
                logits[task] = model(**batch).logits
        config, weights, lora = adapter.stored(adapter.weights())
    finally:
        adapter.remove()
    info = ExpertInfo(name="mtl-lora", tasks=list(tasks), base_model="tiny-llama",
                      base_fingerprint=fingerprint(model), lora=lora, kind="mtl-lora")
    return Expert(info, config, weights=weights), logits


@pytest.fixture()
def batch(tiny) -> dict:
    _, tokenizer = tiny
    return tokenizer(["Repeat: apple 1\nAnswer:", "Hello there, friends"], return_tensors="pt",
                     padding=True)


# ----------------------------------------------------------------------- the formula
def test_at_the_start_l_is_the_identity_b_is_zero_and_the_outputs_are_the_base_ones():
    torch.manual_seed(0)
    base, routing = nn.Linear(16, 12), TaskRouting()
    layer = MTLLoRALinear(base, n_tasks=2, up_projections=3, rank=4, scaling=2.0, dropout=0.0,
                          routing=routing, temperature=0.1)
    assert torch.equal(layer.lora_l, torch.eye(4).repeat(2, 1, 1))
    assert torch.equal(layer.lora_b, torch.zeros(3, 12, 4))
    assert layer.lora_a.abs().max() <= 1 / 4 and layer.lora_a.std() > 0.05  # U(+-1/sqrt(16))
    assert not torch.equal(layer.mix[0], layer.mix[1])  # random: the mix can learn
    x = torch.randn(3, 5, 16)
    routing.task_ids = torch.tensor([1, 0, 1])
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_the_layer_computes_w_x_plus_s_b_t_l_t_a_x_row_by_row():
    torch.manual_seed(0)
    base, routing = nn.Linear(8, 6, bias=False), TaskRouting()
    layer = MTLLoRALinear(base, n_tasks=2, up_projections=3, rank=2, scaling=0.5, dropout=0.0,
                          routing=routing, temperature=0.1)
    randomise([layer])
    x = torch.randn(2, 4, 8)  # (batch, time, in)
    routing.task_ids = torch.tensor([1, 0])
    out = layer(x)
    for row, task in enumerate([1, 0]):
        mix = torch.softmax(layer.mix[task] / 0.1, dim=-1)  # (n,)
        b_t = sum(mix[i] * layer.lora_b[i] for i in range(3))  # (out, r)
        update = b_t @ layer.lora_l[task] @ layer.lora_a  # (out, in)
        torch.testing.assert_close(out[row], base(x[row]) + 0.5 * x[row] @ update.T)
    assert not torch.allclose(out[0], layer(x.flip(0))[1])  # the rows do differ by task
    routing.task_ids = 1  # one task for the whole batch: the same as that id on every row
    single = layer(x)
    routing.task_ids = torch.tensor([1, 1])
    torch.testing.assert_close(single, layer(x))
    torch.testing.assert_close(layer(x[0]), single[0])  # (tokens, in) inputs too
    routing.task_ids = torch.tensor([1, 0, 1])
    with pytest.raises(QuiverError, match="3 task ids for a batch of 2 rows"):
        layer(x)
    routing.task_ids = None
    with pytest.raises(QuiverError, match="needs the task"):
        layer(x)


def test_each_task_row_learns_only_from_its_own_examples(tiny):
    from quiver.data.batching import tokenize_example
    from quiver.training import accumulate_gradients

    model, tokenizer = tiny
    examples = [tokenize_example(tokenizer, e, 64, 0) for e in make_task(n=4).examples]
    adapter = attach_mtl_lora(model, ["a", "b"], SPEC, 4, 16.0, 0.0, ("q_proj", "down_proj"))
    try:
        randomise(adapter.layers.values())
        adapter.train()
        accumulate_gradients(model, examples, tokenizer.pad_token_id,  # task 0's rows only
                             route=adapter.routed)
        layer = adapter.layers["model.layers.1.mlp.down_proj"]
        for part in (layer.lora_l, layer.mix):
            assert part.grad[0].abs().sum() > 0 and torch.equal(part.grad[1],
                                                                torch.zeros_like(part.grad[1]))
        assert layer.lora_a.grad.abs().sum() > 0 and layer.lora_b.grad.abs().sum() > 0
        assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    finally:
        adapter.remove()


# ------------------------------------------------------------------------- training
def test_joint_training_learns_a_row_per_task_and_leaves_the_model_as_found(tiny):
    expert = train_jointly(tiny, "mtl-lora", SPEC, MTLLoRALinear)
    assert expert.info.kind == "mtl-lora" and expert.info.tasks == ["toy:a", "toy:b"]
    assert expert.info.lora["task_rows"] == ["toy:a", "toy:b"]
    assert expert.info.lora["up_projections"] == 3 and expert.info.lora["mix_temperature"] == 0.5
    assert expert.adapter_config["peft_type"] == "MTL_LORA"
    assert expert.adapter_config["n_tasks"] == 2 and expert.adapter_config["r"] == 4
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    weights = {p: expert.weights[f"{key}.{p}"] for p in
               ("mtl_lora_A", "mtl_lora_L", "mtl_lora_B", "mtl_lora_mix")}
    assert [tuple(w.shape) for w in weights.values()] == [(4, 64), (2, 4, 4), (3, 64, 4), (2, 3)]
    lam = weights["mtl_lora_L"]
    moved = (lam - torch.eye(4)).abs().amax(dim=(1, 2))  # (tasks,)
    assert moved.min() > 1e-4 and not torch.allclose(lam[0], lam[1])  # each row trained
    assert weights["mtl_lora_B"].abs().max() > 0


def test_an_interrupted_training_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    check_an_interrupted_training_resumes(tiny, tmp_path, monkeypatch, SPEC,
                                          MTLLoRAConfig(up_projections=2), MTLLoRALinear,
                                          steps=5, eval_every=2, crash=4)


# ---------------------------------------------------------------- storage and export
def test_a_stored_entry_gives_the_outputs_it_was_trained_with(tiny, tmp_path, batch):
    model, _ = tiny
    expert, logits = mtl_entry(model, batch)
    library = new_library(tmp_path / "lib", model)
    library.add(expert)
    adapter = load_mtl_lora(model, library.get("mtl-lora"))
    try:
        for task in ("t2", "t0"):
            adapter.set_task(task)
            with torch.no_grad():
                torch.testing.assert_close(model(**batch).logits, logits[task])
        with pytest.raises(QuiverError, match="no routing row for task 'other'"):
            adapter.set_task("other")
    finally:
        adapter.remove()
    assert not torch.allclose(logits["t0"], logits["t1"], atol=1e-3)  # tasks do differ
    with pytest.raises(QuiverError, match="PEFT cannot load: export one of its tasks"):
        library.export_peft("mtl-lora", str(tmp_path / "whole"))
    assert not (tmp_path / "whole").exists()
    bad = dict(expert.weights)
    bad.pop(next(k for k in bad if k.endswith("mtl_lora_L")))
    with pytest.raises(QuiverError, match="incomplete MTL-LoRA weights"):
        library.add(Expert(dataclasses.replace(expert.info, name="bad"), expert.adapter_config,
                           weights=bad))


def test_a_task_exported_as_a_peft_lora_gives_identical_outputs(tiny, tmp_path, batch):
    from peft import PeftModel

    from quiver.recipes import export_task

    model, _ = tiny
    expert, logits = mtl_entry(model, batch)
    library = new_library(tmp_path / "lib", model)
    library.add(expert)
    lib = str(tmp_path / "lib")
    export_task(lib, "mtl-lora", "t1", out=str(tmp_path / "t1"))
    added = export_task(lib, "mtl-lora", "t2", name="t2-lora")
    assert added.info.kind == "lora" and added.info.tasks == ["t2"]
    assert added.info.source == "mtl-lora:mtl-lora"
    assert added.info.training["exported_from"]["task_row"] == 2
    library.export_peft("t2-lora", str(tmp_path / "t2"))
    assert json.loads((tmp_path / "t1" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for task in ("t1", "t2"):
        fresh, _ = load_base("tiny-llama", device="cpu")
        peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / task)).eval()
        with torch.no_grad():
            theirs = peft_model(**batch).logits
        torch.testing.assert_close(theirs, logits[task], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(theirs, logits["t0"], atol=1e-3)  # not another task's
    # the exported LoRA is an ordinary expert: merges and routers take it
    from quiver.merging import merge_experts

    merged, _ = merge_experts([library.get("t2-lora")], "uniform", "avg")
    assert merged.info.kind == "lora"
    with pytest.raises(QuiverError, match="no row for task 'nope'"):
        export_task(lib, "mtl-lora", "nope", name="x")
    with pytest.raises(QuiverError, match="already exists"):
        export_task(lib, "mtl-lora", "t0", name="t2-lora")
    with pytest.raises(QuiverError, match="only mtl-lora entries export a task"):
        task_lora(library.get("t2-lora"), "t2", "again")
    assert sorted(library.names()) == ["mtl-lora", "t2-lora"]


# ---------------------------------------------------------- build, evaluate, refuse
def test_build_is_one_entry_evaluated_by_task_row_and_refused_by_lora_methods(
        tmp_path, monkeypatch):
    from quiver.adapters import MTLLoRAAdapter
    from quiver.recipes import evaluate_method

    tasks = jsonl_tasks(tmp_path / "tasks")
    lib = str(tmp_path / "lib")
    build = BuildConfig(strategy="mtl-lora", workers=1)
    report = build_library(tasks, lib, "tiny-llama", FAST, build, show_progress=False,
                           adapter=SPEC)
    assert [(o.name, o.status) for o in report.outcomes] == [("mtl-lora", "trained")]
    library = Library(lib)
    assert library.names() == ["mtl-lora"] and library.get("mtl-lora").info.tasks == tasks
    assert library.get("mtl-lora").info.kind == "mtl-lora"
    with pytest.raises(QuiverError, match="made otherwise"):  # not silently kept as if equal
        build_library(tasks, lib, "tiny-llama", FAST, build, show_progress=False,
                      adapter=MTLLoRAConfig(up_projections=2))

    model_and_tokenizer = load_base("tiny-llama", device="cpu")
    rows, set_task = [], MTLLoRAAdapter.set_task

    def recording_set_task(self, task):
        set_task(self, task)
        rows.append(self.routing.task_ids)

    monkeypatch.setattr(MTLLoRAAdapter, "set_task", recording_set_task)
    result = evaluate_method("expert:mtl-lora", tasks[::-1], lib, "tiny-llama",
                             show_progress=False, model_and_tokenizer=model_and_tokenizer)
    assert set(result["tasks"]) == set(tasks) and "exact_match" in result["average"]
    assert rows == [1, 0]  # each task scored with its own row
    assert not any(isinstance(m, MTLLoRALinear) for m in model_and_tokenizer[0].modules())
    with pytest.raises(QuiverError, match="no routing row"):
        evaluate_method("expert:mtl-lora", jsonl_tasks(tmp_path / "o", ("reverse",)), lib,
                        "tiny-llama", show_progress=False,
                        model_and_tokenizer=model_and_tokenizer)
    with pytest.raises(QuiverError, match="mtl-lora adapter .* not a LoRA: arrow routing"):
        evaluate_method("arrow", jsonl_tasks(tmp_path / "o", ("reverse",)), lib, "tiny-llama",
                        show_progress=False, model_and_tokenizer=model_and_tokenizer)
    from quiver.transforms.mbc import MBCConfig, cluster_experts

    with pytest.raises(QuiverError, match="MBC clustering needs LoRA experts.*export-task"):
        cluster_experts(library.experts() * 2, MBCConfig(k=1))


def test_an_interrupted_build_resumes_where_it_stopped(tiny, tmp_path, monkeypatch):
    check_an_interrupted_build_resumes(tiny, tmp_path, monkeypatch, "mtl-lora", SPEC, FAST)


def test_options_of_another_adapter_are_refused_before_anything_is_written(tmp_path):
    from quiver.adapters import PolyMHRConfig, adapter_for_strategy

    with pytest.raises(QuiverError, match="--skills: options of poly adapters, not of "
                                          "--strategy mtl-lora"):
        adapter_for_strategy("mtl-lora", [PolyMHRConfig(skills=2), MTLLoRAConfig()])
    with pytest.raises(QuiverError, match="--up-projections: options of mtl-lora adapters"):
        adapter_for_strategy("private", [PolyMHRConfig(), MTLLoRAConfig(up_projections=2)])
    assert adapter_for_strategy("private", [PolyMHRConfig(), MTLLoRAConfig()]) is None
    assert adapter_for_strategy("mtl-lora", [PolyMHRConfig(), SPEC]) == SPEC
    assert adapter_for_strategy("mtl-lora", []) == MTLLoRAConfig()
    with pytest.raises(QuiverError, match="mhr trains with a PolyMHRConfig, not a MTLLoRA"):
        build_library(jsonl_tasks(tmp_path / "tasks"), str(tmp_path / "lib"), "tiny-llama",
                      FAST, BuildConfig(strategy="mhr"), show_progress=False, adapter=SPEC)
    assert not (tmp_path / "lib").exists()
    with pytest.raises(QuiverError, match="invalid MTLLoRAConfig"):
        from quiver.adapters import adapter_from_dict

        adapter_from_dict({"kind": "mtl-lora", "up_projections": 0})


def test_build_ls_eval_export_and_refusals_from_the_command_line(tmp_path, monkeypatch,
                                                                  capsys):
    tasks_file = tmp_path / "train.txt"
    tasks_file.write_text("\n".join(jsonl_tasks(tmp_path / "tasks")))
    lib = tmp_path / "lib"
    code, out, err = run_cli(monkeypatch, capsys, "build", "--strategy", "mtl-lora",
                             "--up-projections", 2, "--mix-temperature", 0.5, "--tasks-file",
                             tasks_file, "--library", lib, "--base", "tiny-llama", "--steps",
                             2, "--eval-every", 2, "--batch-size", 4, "--workers", 1, "--quiet")
    assert code == 0, err
    assert "mtl-lora library" in out and "trained" in out
    code, out, _ = run_cli(monkeypatch, capsys, "library", "ls", lib)
    assert "mtl-lora (n=2, tau=0.5)" in out, out
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--method", "expert:mtl-lora",
                             "--library", lib, "--base", "tiny-llama", "--tasks-file",
                             tasks_file, "--limit", 2)
    assert code == 0, err
    assert "copy" in out and "upper" in out
    code, _, err = run_cli(monkeypatch, capsys, "merge", lib, "--method", "uniform", "--name",
                           "avg")
    assert code == 2 and "is a mtl-lora adapter" in err and "export-task" in err
    assert len(err.strip().splitlines()) <= 3  # one line, folded by the terminal width
    code, _, err = run_cli(monkeypatch, capsys, "library", "export-peft", lib, "mtl-lora",
                           tmp_path / "whole")
    assert code == 2 and "PEFT cannot load" in err and not (tmp_path / "whole").exists()
    copy_task = jsonl_tasks(tmp_path / "tasks")[0]
    code, out, err = run_cli(monkeypatch, capsys, "library", "export-task", lib, "mtl-lora",
                             copy_task, "--name", "copy-lora")
    assert code == 0, err
    assert "added copy-lora" in out and Library(str(lib)).get("copy-lora").info.kind == "lora"
    code, out, err = run_cli(monkeypatch, capsys, "library", "export-peft", lib, "mtl-lora",
                             tmp_path / "peft", "--task", copy_task)
    assert code == 0, err
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    code, _, err = run_cli(monkeypatch, capsys, "build", "--strategy", "mtl-lora", "--skills",
                           2, "--tasks-file", tasks_file, "--library", tmp_path / "other",
                           "--base", "tiny-llama")
    assert code == 2 and "--skills: options of poly adapters" in err
    assert not (tmp_path / "other").exists()
