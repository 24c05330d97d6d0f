"""reasoning-gym tasks (`gym:`): names with knobs, deterministic disjoint splits, families,
the package's own scorer, multiple choice over a closed answer set, and bad names."""

from __future__ import annotations

import pytest
import reasoning_gym
import torch

from quiver.data import list_gym, load_task
from quiver.data.batching import split_trailing_space
from quiver.errors import QuiverError
from quiver.evaluation import EvalConfig, evaluate

from .conftest import run_cli


def test_knobs_in_the_name_reach_the_generator_and_the_name_is_canonical():
    task = load_task("gym:chain_sum?size=40&max_terms=2&max_digits=1")
    assert task.name == "gym:chain_sum?max_digits=1&max_terms=2&size=40"
    assert task.kind == "gen" and len(task.examples) <= 40
    for example in task.examples:  # one-digit terms, two of them
        question = example.entry["question"]
        assert example.prompt == question + "\nAnswer:"
        assert example.target == " " + example.entry["answer"]
    reference = reasoning_gym.create_dataset("chain_sum", size=40, seed=0, max_terms=2,
                                             max_digits=1)
    assert task.examples[0].entry["question"] == reference[0]["question"]
    assert task.metadata["config"]["max_terms"] == 2 and task.metadata["family"] == "arithmetic"


def test_knobs_at_their_defaults_are_left_out_of_the_name():
    assert load_task("gym:chain_sum?size=1000&seed=0&max_terms=6").name == "gym:chain_sum"
    assert load_task("gym:syllogism?mc=false&size=40").name == "gym:syllogism?size=40"
    assert load_task("gym:chain_sum?max_terms=3&size=50").name == (
        "gym:chain_sum?max_terms=3&size=50")


def test_same_name_gives_the_same_examples_and_seed_changes_them():
    a = [e.prompt for e in load_task("gym:spell_backward?size=50").examples]
    b = [e.prompt for e in load_task("spell_backward?size=50").examples]  # a bare name
    c = [e.prompt for e in load_task("gym:spell_backward?size=50&seed=1").examples]
    assert a == b and a != c


def test_splits_are_disjoint_by_question_and_their_size_is_settable():
    task = load_task("gym:basic_arithmetic?max_digits=1&max_terms=2&size=300")
    questions = [e.prompt for e in task.examples]
    assert len(set(questions)) == len(questions) < 300  # one-digit sums repeat: dropped
    parts = {p: {e.prompt for e in task.split(p)} for p in ("train", "valid", "test")}
    assert not parts["train"] & parts["test"] and not parts["valid"] & parts["test"]
    assert not parts["train"] & parts["valid"]
    assert sum(map(len, parts.values())) == len(questions)
    assert len(load_task("gym:basic_arithmetic?size=120").examples) == 120


def test_score_is_the_package_s_own_scorer():
    task = load_task("gym:word_sorting?size=20")
    dataset = reasoning_gym.create_dataset("word_sorting", size=20, seed=0)
    for example, answer in zip(task.examples[:5], ["", "a, b", None, "x", "y"], strict=True):
        gold = example.target.strip()
        assert task.score_answer(gold, example) == 1.0
        if answer is not None:
            index = next(i for i in range(20) if dataset[i]["question"] == example.entry[
                "question"])
            assert task.score_answer(answer, example) == dataset.score_answer(answer,
                                                                              dataset[index])


def test_an_answer_the_package_s_scorer_cannot_parse_scores_zero():
    """prime_factorization's own scorer raises on `3 = 6` (a model's answer from the families
    benchmark); quiver scores it as the wrong answer it is, and still 1 for the right one."""
    task = load_task("gym:prime_factorization?max_value=200&size=20")
    example = task.examples[0]
    dataset = reasoning_gym.create_dataset("prime_factorization", max_value=200, size=20, seed=0)
    with pytest.raises(ValueError):
        dataset.score_answer("3 = 6", example.entry)
    assert task.score_answer("3 = 6", example) == 0.0
    assert task.score_answer(example.target.strip(), example) == 1.0


def test_families_are_reasoning_gym_s_categories():
    rows = {r.name: r for r in list_gym()}
    assert rows["gym:chain_sum"].family == "arithmetic"
    assert rows["gym:spell_backward"].family == "algorithmic"
    assert "gym:composite" not in rows and len(rows) >= 100
    assert {r.family for r in rows.values()} >= {"algebra", "arithmetic", "games", "logic"}


def test_closed_answer_set_can_be_scored_as_multiple_choice(tiny):
    task = load_task("gym:syllogism?size=40&mc=true")
    assert task.kind == "mc" and task.name == "gym:syllogism?mc=true&size=40"
    assert {e.options for e in task.examples} == {(" No", " Yes")}
    assert all(e.options[e.answer] == e.target for e in task.examples)
    model, tokenizer = tiny
    report = evaluate(model, tokenizer, [task], EvalConfig(limit=4), show_progress=False)
    assert report["tasks"][task.name]["examples"] == 4
    with pytest.raises(QuiverError, match="closed set"):
        load_task("gym:chain_sum?size=40&mc=true")


@pytest.mark.parametrize("name, message", [
    ("gym:no_such_generator", "unknown reasoning-gym task"),
    ("gym:composite", "needs a config"),
    ("gym:chain_sum?max_colour=3", "has no knob max_colour"),
    ("gym:chain_sum?max_terms", "KNOB=VALUE"),
    ("gym:chain_sum?size=5&size=6", "given twice"),
    ("gym:chain_sum?min_terms=5&max_terms=2", "refuses chain_sum"),
    ("gym:boxnet?size=5", "no reference answers"),
    ("gym:chain_sum?size=0", "size must be positive"),
])
def test_bad_gym_names_are_one_clear_error(name, message):
    with pytest.raises(QuiverError, match=message):
        load_task(name)


def test_gym_tasks_are_scored_by_their_scorer_and_answer_log_likelihood(tiny):
    """`score` is the mean of the package's scores of the generated answers; `answer_loglik`
    the target's mean log-probability per token, recomputed here from a plain forward pass."""
    model, tokenizer = tiny
    task = load_task("gym:spell_backward?size=30&max_word_len=4")
    report = evaluate(model, tokenizer, [task], EvalConfig(limit=3, max_new_tokens=6),
                      show_progress=False)
    result = report["tasks"][task.name]
    examples = task.split("test")[:3]
    scores = [task.score_answer(a, e) for a, e in zip(result["answers"], examples, strict=True)]
    assert result["per_example"]["score"] == scores
    assert result["score"] == pytest.approx(100 * sum(scores) / 3)
    for example, got in zip(examples, result["per_example"]["answer_loglik"], strict=True):
        prompt, target = split_trailing_space(example.prompt, example.target)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([p + t])).logits[0].float(), -1)
        expected = sum(log_probs[len(p) - 1 + j, tok].item() for j, tok in enumerate(t)) / len(t)
        assert got == pytest.approx(expected, abs=1e-4)
    assert report["average"]["answer_loglik"] == pytest.approx(result["answer_loglik"])


def test_tasks_ls_and_show_list_gym_tasks_with_their_family(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "tasks", "ls", "--contains", "games")
    assert code in (0, None)
    assert "gym:maze" in out and "gym:chain_sum" not in out  # a family's tasks only
    code, out, _ = run_cli(monkeypatch, capsys, "tasks", "show", "gym:chain_sum?size=50")
    assert code in (0, None) and '"family": "arithmetic"' in out and '"max_terms": 6' in out
    code, _, err = run_cli(monkeypatch, capsys, "tasks", "show", "gym:nope")
    assert code == 2 and "unknown reasoning-gym task" in err
