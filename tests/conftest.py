"""Shared fixtures: the tiny test model, a small real task, and a library of tiny experts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quiver.data import Example, Task
from quiver.library import Library
from quiver.models import fingerprint, linear_module_shapes, load_base
from quiver.training import TrainConfig, train_expert

QUICK = TrainConfig(steps=6, eval_every=3, batch_size=4, max_length=64, eval_examples=16, lr=1e-3)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the tiny random Llama; tests must leave it unchanged."""
    torch.set_num_threads(2)
    return load_base("tiny-llama", device="cpu")


def _model_state(model) -> tuple:
    """What a test could leave changed in a shared model: modules, weights, modes, threads."""
    return (tuple(name for name, _ in model.named_modules()),
            tuple((name, p.requires_grad, p.detach().clone()) for name, p in
                  model.named_parameters()),
            model.training, torch.get_num_threads())


@pytest.fixture(autouse=True)
def _tiny_stays_unchanged(request):
    """Fail the test that leaves the shared tiny model (or the thread count) changed, rather
    than a later test that happens to depend on it."""
    if "tiny" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("tiny")[0]
    before = _model_state(model)
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
