"""Shared fixtures: the tiny test model, a small real task, a library of tiny experts, and a
small BIG-bench in BIG-bench's file layout (tests/bigbench_fixture.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from contextlib import contextmanager

import pytest
import torch

from quiver.adapters.task_rows import task_routing
from quiver.data import Example, Task
from quiver.data.bigbench import ENV_DIR
from quiver.library import Library
from quiver.models import fingerprint, linear_module_shapes, load_base
from quiver.training import TrainConfig, train_expert

from .bigbench_fixture import write_bigbench

QUICK = TrainConfig(steps=6, eval_every=3, batch_size=4, max_length=64, eval_examples=16, lr=1e-3)


TINY_AS_LOADED = pytest.StashKey[tuple]()


@pytest.fixture(scope="session", autouse=True)
def bigbench_files(tmp_path_factory):
    """The fixture BIG-bench, for every test and every `quiver` the tests start: BIG-bench
    itself is not on the registry, and a user's own copy must not change what tests see."""
    root = write_bigbench(tmp_path_factory.mktemp("bigbench"))
    before = os.environ.get(ENV_DIR)
    os.environ[ENV_DIR] = str(root)
    yield root
    if before is None:
        os.environ.pop(ENV_DIR, None)
    else:
        os.environ[ENV_DIR] = before


@pytest.fixture(scope="session")
def tiny(request):
    """(model, tokenizer) of the tiny random Llama; tests must leave it unchanged."""
    torch.set_num_threads(2)
    model, tokenizer = load_base("tiny-llama", device="cpu")
    request.config.stash[TINY_AS_LOADED] = _model_state(model)
    return model, tokenizer


@contextmanager
def restored(model):
    """Put `model`'s train/eval mode and `requires_grad` flags back afterwards: PEFT's
    `get_peft_model` freezes the base model, and `unload` does not unfreeze it."""
    mode, flags = model.training, [p.requires_grad for p in model.parameters()]
    try:
        yield model
    finally:
        model.train(mode)
        for param, flag in zip(model.parameters(), flags, strict=True):
            param.requires_grad_(flag)


def _model_state(model) -> tuple:
    """What a test could leave changed in a shared model: modules, weights, modes, threads."""
    return (tuple(name for name, _ in model.named_modules()),
            tuple((name, p.requires_grad, p.detach().clone()) for name, p in
                  model.named_parameters()),
            model.training, torch.get_num_threads())


@pytest.fixture(autouse=True)
def _tiny_stays_unchanged(request):
    """Fail the test that leaves the shared tiny model (or the thread count) other than as it
    was loaded, rather than a later test that happens to depend on it. Compared with the
    loaded state, not the state before the test: module- and session-scoped fixtures change
    it before this fixture runs, and the first test that uses one must catch that."""
    if "tiny" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("tiny")[0]
    before = request.config.stash[TINY_AS_LOADED]
    yield
    after = _model_state(model)
    assert before[0] == after[0], "the test left modules added to or removed from `tiny`"
    for (name, grad, value), (_, grad_after, value_after) in zip(before[1], after[1],
                                                                   strict=True):
        assert grad == grad_after, f"the test left {name}.requires_grad changed in `tiny`"
        assert torch.equal(value, value_after), f"the test left {name} changed in `tiny`"
    assert before[2:] == after[2:], "the test left `tiny`'s mode or the thread count changed"


def make_task(name: str = "toy:copy", n: int = 60) -> Task:
    """A generative task the tiny model can learn a little of: repeat a word."""
    words = ["apple", "river", "stone", "cloud", "green", "house", "light", "music"]
    examples = [Example(f"Repeat: {words[i % 8]} {i}\nAnswer:", f" {words[i % 8]} {i}")
                for i in range(n)]
    return Task(name, examples, kind="gen")


@pytest.fixture()
def toy_task() -> Task:
    return make_task()


def new_library(path, model) -> Library:
    library = Library(str(path), create=True)
    library.ensure_base("tiny-llama", fingerprint(model), linear_module_shapes(model))
    return library


@pytest.fixture(scope="module")
def tiny_library(tiny, tmp_path_factory):
    """A local library with two tiny trained experts, `alpha` and `beta`."""
    model, tokenizer = tiny
    library = new_library(tmp_path_factory.mktemp("lib") / "library", model)
    for index, name in enumerate(["alpha", "beta"]):
        config = dataclasses.replace(QUICK, seed=index)
        expert, _ = train_expert(model, tokenizer, [make_task(f"toy:{name}")], name, config,
                                 show_progress=False)
        library.add(expert)
    return library


WORDS = ["apple", "river", "stone", "cloud", "green", "house", "light", "music"]


def write_task(path, how: str = "copy", n: int = 24) -> str:
    """A tiny generative JSONL task; returns its task name (`jsonl:PATH`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    verbs = {"copy": lambda w: w, "upper": str.upper, "reverse": lambda w: w[::-1],
             "first": lambda w: w[0]}
    rows = [{"prompt": f"{how}: {WORDS[i % 8]} {i}\nAnswer:",
             "target": f" {verbs[how](WORDS[i % 8])}"} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return f"jsonl:{path}"


def jsonl_tasks(folder, hows=("copy", "upper")) -> list[str]:
    """Tiny generative JSONL tasks in `folder` (loadable by name, as the CLI needs)."""
    return [write_task(folder / f"{how}.jsonl", how) for how in hows]


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`quiver ARGS` through the real entry point, in this process (a subprocess costs ~8 s)."""
    from quiver.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["quiver", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    return done.value.code, out, err


def check_an_interrupted_build_resumes(tiny, folder, monkeypatch, strategy, spec, config):
    """Build `strategy` (one entry named after it) on two tiny tasks, stop it at step 3, build
    again: it trains steps 2 and 3 only, clears its run state, and stores exactly the weights
    of a training never interrupted."""
    import quiver.training as training
    from quiver.build import BuildConfig, build_library
    from quiver.data import load_task

    tasks = jsonl_tasks(folder / "tasks")
    lib = str(folder / "lib")
    build = BuildConfig(strategy=strategy, workers=1)
    real, steps_run, crash = training.loop._lr_factor, [], {"at": 3}

    def factor(step, steps, warmup):
        if step == crash["at"]:
            raise KeyboardInterrupt
        steps_run.append(step)
        return real(step, steps, warmup)

    monkeypatch.setattr(training.loop, "_lr_factor", factor)
    with pytest.raises(KeyboardInterrupt):
        build_library(tasks, lib, "tiny-llama", config, build, show_progress=False,
                      adapter=spec)
    assert Library(lib).names() == [] and Library(lib).run_state(strategy).read()[1][
        "step"] == 2
    crash["at"] = None
    steps_run.clear()
    report = build_library(tasks, lib, "tiny-llama", config, build, show_progress=False,
                           adapter=spec)
    assert [o.status for o in report.outcomes] == ["trained"] and steps_run == [2, 3]
    assert Library(lib).run_state(strategy).read() is None  # cleared once stored
    model, tokenizer = tiny
    uninterrupted, _ = train_expert(model, tokenizer, [load_task(t) for t in tasks], strategy,
                                    config, adapter=spec, show_progress=False)
    resumed = Library(lib).get(strategy)
    for key, value in uninterrupted.weights.items():  # the stored (PEFT) form of both
        torch.testing.assert_close(resumed.weights[key], value, rtol=0, atol=0)


def train_jointly(tiny, kind: str, spec, layer_class) -> object:
    """Train a multi-task adapter of `kind` on two toy tasks (QUICK) and check that the model
    is left as found: weights, requires_grad, no `layer_class` layer, no task routing."""
    model, tokenizer = tiny
    before, flags = fingerprint(model), [p.requires_grad for p in model.parameters()]
    tasks = [make_task("toy:a"), make_task("toy:b")]
    expert, result = train_expert(model, tokenizer, tasks, kind, QUICK, adapter=spec,
                                  show_progress=False)
    assert result.steps == QUICK.steps and len(result.history) == 2
    assert fingerprint(model) == before and not any(
        isinstance(m, layer_class) for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert task_routing(model) is None
    return expert


def check_an_interrupted_training_resumes(tiny, folder, monkeypatch, spec, other_spec,
                                          layer_type, steps: int, eval_every: int,
                                          crash: int) -> None:
    """Train adapter `spec` on two toy tasks, crash at step `crash` (after the run state saved
    at the last validation before it), check the adapter's layers (`layer_type`) left the
    model, that `other_spec` refuses to resume the run, and that resuming stores exactly the
    weights of a training never interrupted."""
    import quiver.training as training
    from quiver.errors import QuiverError

    model, tokenizer = tiny
    library = new_library(folder / "lib", model)
    tasks = [make_task("toy:a"), make_task("toy:b")]
    config = dataclasses.replace(QUICK, steps=steps, eval_every=eval_every)
    uninterrupted, _ = train_expert(model, tokenizer, tasks, "m", config, adapter=spec,
                                    show_progress=False)
    real = training.loop._lr_factor

    def crash_at(step, steps, warmup):
        if step == crash:
            raise KeyboardInterrupt
        return real(step, steps, warmup)

    monkeypatch.setattr(training.loop, "_lr_factor", crash_at)
    with pytest.raises(KeyboardInterrupt):
        train_expert(model, tokenizer, tasks, "m", config, library.run_state("m"),
                     show_progress=False, adapter=spec)
    assert library.run_state("m").read()[1]["step"] == crash // eval_every * eval_every
    assert not any(isinstance(m, layer_type) for m in model.modules())  # removed on a crash
    monkeypatch.setattr(training.loop, "_lr_factor", real)
    with pytest.raises(QuiverError, match="another config"):  # another adapter: not this run
        train_expert(model, tokenizer, tasks, "m", config, library.run_state("m"),
                     show_progress=False, adapter=other_spec)
    resumed, _ = train_expert(model, tokenizer, tasks, "m", config, library.run_state("m"),
                              show_progress=False, adapter=spec)
    for key, value in uninterrupted.weights.items():
        torch.testing.assert_close(resumed.weights[key], value, rtol=0, atol=0)


def random_lora(name: str, model, generator: torch.Generator, modules=None, scale=0.5,
                rank: int = 4):
    """An untrained LoRA expert with random A and B (B large enough to change the outputs)."""
    from quiver.library import Expert, ExpertInfo

    modules = modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"]
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
              "target_modules": list(modules), "bias": "none", "task_type": "CAUSAL_LM"}
    weights = {}
    for module, (fan_in, fan_out) in linear_module_shapes(model).items():
        if module.rsplit(".", 1)[-1] in modules:
            key = f"base_model.model.{module}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in,
                                                          generator=generator) / fan_in**0.5
            weights[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank,
                                                          generator=generator) * scale
    info = ExpertInfo(name, [f"toy:{name}"], "tiny-llama", fingerprint(model),
                      {"r": rank, "lora_alpha": 2 * rank}, source="synthetic")
    return Expert(info, config, weights=weights)


@pytest.fixture(scope="session")
def served_library(tiny, tmp_path_factory) -> Library:
    """Random experts `a`, `b` (all linear layers), `c` (q and v only) and `ab`, their
    uniform merge: a library to serve, made in milliseconds."""
    from quiver.merging import merge_experts

    model, _ = tiny
    library = new_library(tmp_path_factory.mktemp("served") / "library", model)
    generator = torch.Generator().manual_seed(0)
    for name, modules in [("a", None), ("b", None), ("c", ["q_proj", "v_proj"])]:
        library.add(random_lora(name, model, generator, modules))
    library.add(merge_experts(library.experts(["a", "b"]), "uniform", "ab")[0])
    return library


# What tests/test_generate.py and tests/test_serve.py ask the served library: prompts of 1 to 8
# tokens whose greedy choices are clear (checked below), and every name it serves.
SERVED_PROMPTS = ["Paris is the capital of", "Hi", "One two three four",
                  "Repeat: apple 3\nAnswer:"]
SERVED_NAMES = ["base", "arrow", "uniform", "expert:a", "expert:b", "expert:c", "expert:ab"]
SERVED_STEPS = 5


def reference_generation(model, tokenizer, library, name: str, prompt: str):
    """(tokens, logits (steps, vocab)) of greedy decoding of one request alone: the bare
    model, or `quiver.reuse` with the named method or single expert."""
    from quiver.routing import detach_experts
    from quiver.zero_shot import reuse

    if name in ("arrow", "uniform"):
        reuse(model, library, method=name)
    elif name.startswith("expert:"):
        reuse(model, library, method="uniform", experts=[name.split(":", 1)[1]])
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=SERVED_STEPS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True,
                                 eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    finally:
        if name != "base":
            detach_experts(model)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.scores)[:, 0]


@pytest.fixture(scope="session")
def served_references(tiny, served_library) -> dict:
    """`{(name, prompt): (tokens, logits)}` for every served name and prompt, one at a time."""
    model, tokenizer = tiny
    refs = {(n, p): reference_generation(model, tokenizer, served_library, n, p)
            for n in SERVED_NAMES for p in SERVED_PROMPTS}
    for _, logits in refs.values():  # greedy choices far from ties: batching cannot flip them
        top = logits.topk(2, dim=-1).values
        assert (top[:, 0] - top[:, 1]).min() > 1e-3
    return refs
