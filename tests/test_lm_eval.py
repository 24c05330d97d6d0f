"""quiver as an lm-evaluation-harness model: the bridge, the offline task configs, and the
reference check against `quiver eval` (and against lm-eval's own Hugging Face model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quiver.data import load_task
from quiver.errors import QuiverError
from quiver.evaluation import EvalConfig
from quiver.evaluation.lm_eval_tasks import GROUP, lm_eval_name, write_task_configs
from quiver.evaluation.scoring import postprocess, score_choices_batch
from quiver.recipes import evaluate_method

from .conftest import run_cli

lm_eval = pytest.importorskip("lm_eval")  # the extra; scripts/setup.sh installs it

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from quiver.lm_eval_bridge import QuiverLM  # noqa: E402

TASKS = ["bigbench:emoji_movie", "bigbench:winowhy", "bigbench:hindu_knowledge"]
LIMIT = 12


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """Every example of the three tasks written for lm-eval (lm-eval's --limit takes the
    first LIMIT: quiver's --split all --limit LIMIT), and a TaskManager over them alone."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    written = write_task_configs(folder, TASKS)
    return folder, written, TaskManager(include_path=str(folder), include_defaults=False)


def _lm_eval(lm, configs, log_samples: bool = True) -> dict:
    _, written, manager = configs
    return lm_eval.simple_evaluate(model=lm, tasks=[w.name for w in written], limit=LIMIT,
                                   task_manager=manager, log_samples=log_samples,
                                   bootstrap_iters=0)


def _log_likelihoods(results: dict, task: str) -> list[list[float]]:
    """Per example (in document order), each option's log-likelihood as lm-eval got it."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


@pytest.mark.parametrize("method", ["base", "arrow"])
def test_lm_eval_through_the_bridge_agrees_with_quiver_eval(tiny, tiny_library, configs,
                                                            method):
    """acc is quiver's accuracy on the same examples; the options' log-likelihoods are
    quiver's and lm-eval's own HF model's (an independent scorer) on the same routed model;
    acc_norm and accuracy_char_norm are the same rule (log-likelihood per character of the
    option)."""
    model, tokenizer = tiny
    library = tiny_library.url if method != "base" else None
    report = evaluate_method(method, TASKS, library, "tiny-llama",
                             EvalConfig(split="all", limit=LIMIT, batch_size=4),
                             model_and_tokenizer=tiny, show_progress=False)
    lm = QuiverLM(library=library, method=method, model=model, tokenizer=tokenizer,
                  batch_size=4)
    try:
        assert lm.names == ([] if method == "base" else ["alpha", "beta"])
        bridge = _lm_eval(lm, configs)
        independent = _lm_eval(HFLM(pretrained=lm.model, tokenizer=tokenizer, batch_size=4),
                               configs)
        examples = {t: load_task(t).split("all")[:LIMIT] for t in TASKS}
        quiver_scores = {t: [s.log_probs for s in score_choices_batch(lm.model, tokenizer, ex)]
                         for t, ex in examples.items()}
    finally:
        lm.close()
    assert bridge["config"]["quiver_method"] == method
    for task in TASKS:
        name, ours = lm_eval_name(task), report["tasks"][task]
        result = bridge["results"][name]
        assert result["sample_len"] == ours["examples"] == LIMIT
        assert result["acc,none"] * 100 == pytest.approx(ours["accuracy"], abs=1e-9)
        assert independent["results"][name]["acc,none"] == result["acc,none"]
        hits = [s["acc"] for s in sorted(bridge["samples"][name], key=lambda s: s["doc_id"])]
        assert hits == ours["per_example"]["accuracy"]
        lls = _log_likelihoods(bridge, name)
        np.testing.assert_allclose(np.concatenate(lls),
                                   np.concatenate(quiver_scores[task]), rtol=0, atol=1e-4)
        np.testing.assert_allclose(np.concatenate(_log_likelihoods(independent, name)),
                                   np.concatenate(lls), rtol=0, atol=1e-4)
        # acc_norm: lm-eval divides by len(option), and so does quiver's accuracy_char_norm
        options = [e.options for e in examples[task]]
        answers = [e.answer for e in examples[task]]
        lm_rule = [float(np.argmax(np.array(ll) / [len(o) for o in opts]) == a)
                   for ll, opts, a in zip(lls, options, answers, strict=True)]
        assert result["acc_norm,none"] == pytest.approx(np.mean(lm_rule))
        assert lm_rule == ours["per_example"]["accuracy_char_norm"]
        acc_norm = [s["acc_norm"] for s in sorted(bridge["samples"][name],
                                                  key=lambda s: s["doc_id"])]
        assert acc_norm == ours["per_example"]["accuracy_char_norm"]


def test_written_configs_hold_quiver_eval_s_examples_in_its_order(configs):
    folder, written, manager = configs
    assert [w.quiver_name for w in written] == TASKS
    assert (folder / f"{GROUP}.yaml").exists() and GROUP in manager.all_groups
    for w in written:
        task = load_task(w.quiver_name)
        docs = [json.loads(line) for line in w.data.read_text().splitlines()]
        assert w.examples == len(docs) == len(task.examples)
        for doc, example in zip(docs, task.split("all"), strict=True):
            assert doc["context"] + " " == example.prompt  # BIG-bench's "A: "
            assert doc["choices"] == list(example.options) and doc["answer"] == example.answer
        assert w.name in manager.all_tasks


GYM_TASK = "gym:spell_backward?max_word_len=4&size=60"


@pytest.mark.parametrize("method", ["base", "arrow"])
def test_gym_generation_through_the_bridge_agrees_with_quiver_eval(tiny, served_library,
                                                                   tmp_path, method):
    """A generative gym task: lm-eval generates through the bridge, cuts and scores with the
    written process_results; the answers are quiver eval's, token for token, and so are the
    package scores and exact matches, example by example. (Arrow over the served library's
    random experts gives every prompt its own answer.)"""
    model, tokenizer = tiny
    [written] = write_task_configs(tmp_path, [GYM_TASK], limit=LIMIT, tokenizer=tokenizer)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    library = served_library.url if method != "base" else None
    report = evaluate_method(method, [GYM_TASK], library, "tiny-llama",
                             EvalConfig(split="all", limit=LIMIT, batch_size=4),
                             model_and_tokenizer=tiny, show_progress=False)
    ours = report["tasks"][GYM_TASK]
    lm = QuiverLM(library=library, method=method, model=model, tokenizer=tokenizer,
                  batch_size=4)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=[written.name], limit=LIMIT,
                                          task_manager=manager, log_samples=True,
                                          bootstrap_iters=0)
    finally:
        lm.close()
    samples = sorted(results["samples"][written.name], key=lambda s: s["doc_id"])
    task = load_task(GYM_TASK)
    answers = [postprocess(s["resps"][0][0], task.metadata["stop_string"], None)
               for s in samples]
    assert answers == ours["answers"]
    assert method == "base" or len(set(answers)) > LIMIT // 2
    assert [s["score"] for s in samples] == ours["per_example"]["score"]
    assert [s["exact_match"] for s in samples] == ours["per_example"]["exact_match"]
    assert results["results"][written.name]["score,none"] * 100 == pytest.approx(ours["score"])


def test_the_written_scorer_is_the_package_s_own(tmp_path, tiny):
    from quiver.evaluation.lm_eval_tasks import process_generated

    [written] = write_task_configs(tmp_path, [GYM_TASK], limit=3, tokenizer=tiny[1])
    docs = [json.loads(line) for line in written.data.read_text().splitlines()]
    task = load_task(GYM_TASK)
    for doc, example in zip(docs, task.split("all"), strict=False):
        assert doc["context"] == example.prompt  # gym prompts end with the cue, no space
        assert process_generated(doc, [" " + doc["target"] + "\nmore"]) == {
            "score": 1.0, "exact_match": 1.0}
        assert process_generated(doc, ["wrong"])["score"] == task.score_answer("wrong", example)
    assert "process_results: !function quiver_scorer.process_results" in (
        written.config.read_text())


def test_written_configs_refuse_generative_tasks_without_a_scorer(tmp_path):
    with pytest.raises(QuiverError, match="without one"):
        write_task_configs(tmp_path / "a", ["bigbench:emoji_movie", "bigbench:auto_debugging"])
    assert not (tmp_path / "a").exists()  # nothing written
    with pytest.raises(QuiverError, match="tokenizer"):
        write_task_configs(tmp_path / "a", [GYM_TASK])
    assert not (tmp_path / "a").exists()


def test_written_configs_cut_to_the_limit(tmp_path):
    [w] = write_task_configs(tmp_path / "b", ["bigbench:emoji_movie"], limit=5)
    assert w.examples == 5 and len(w.data.read_text().splitlines()) == 5
    assert lm_eval_name("bigbench:bbq_lite_json/age_ambig") == (
        "quiver_bigbench_bbq_lite_json.age_ambig")


@pytest.mark.parametrize("args, message", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"method": "oracle", "library": "x"}, "routes by task"),
    ({"method": "arrow"}, "needs a library"),
    ({"library": "/no/such/library"}, "no library at"),
    ({"method": "base", "general": "shared"}, "uses no library"),
    ({"colour": "blue"}, "unknown quiver model argument"),
    ({"batch_size": "many"}, "batch_size"),
])
def test_bad_model_args_are_refused_in_one_line_before_loading(args, message):
    with pytest.raises(QuiverError, match=message):
        QuiverLM(**args)


def test_bad_experts_are_refused(tiny, tiny_library):
    model, tokenizer = tiny
    for args, message in [({"method": "expert:gamma"}, "gamma"),
                          ({"method": "uniform", "general": "alpha"}, "Arrow only")]:
        with pytest.raises(QuiverError, match=message):
            QuiverLM(library=tiny_library.url, model=model, tokenizer=tokenizer, **args)


def test_rolling_log_likelihood_and_generation_match_lm_eval_s_hf_model(tiny):
    """Rolling windows (max_length 8, so several) and greedy generation cut at `until`:
    the same numbers and texts as lm-eval's HFLM on the same model."""
    model, tokenizer = tiny
    ours = QuiverLM(model=model, tokenizer=tokenizer, batch_size=2, max_length=8)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=8)
    texts = ["Paris is the capital of France, and Rome is the capital of Italy.", "Hi"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling, disable_tqdm=True),
                               theirs.loglikelihood_rolling(rolling, disable_tqdm=True),
                               rtol=0, atol=1e-4)
    ids = tokenizer(texts[1], return_tensors="pt").input_ids  # one window: the plain sum
    with torch.no_grad():
        logits = model(torch.tensor([[tokenizer.bos_token_id, *ids[0].tolist()]])).logits
    direct = torch.log_softmax(logits[0, :-1].float(), -1).gather(1, ids[0][:, None]).sum()
    assert ours.loglikelihood_rolling(rolling[1:], disable_tqdm=True)[0] == pytest.approx(
        direct.item(), abs=1e-4)
    ours.max_length = theirs._max_length = 64
    kwargs = {"until": [" the"], "max_gen_toks": 6, "do_sample": False}
    prompts = ["Repeat: apple 3\nAnswer:", "One two three four", "Paris is"]
    generate = [Instance("generate_until", {}, (p, dict(kwargs)), i)
                for i, p in enumerate(prompts)]
    assert ours.generate_until(generate, disable_tqdm=True) == theirs.generate_until(
        generate, disable_tqdm=True)


def test_the_command_line_runs_offline_with_lm_eval_s_own_arguments(configs, tmp_path,
                                                                    monkeypatch, capsys, tiny):
    """`quiver lm-eval` is lm-eval's command line with the model registered: base on the
    tiny model, four examples; lm-eval writes its results file."""
    folder, written, _ = configs
    code, out, _ = run_cli(monkeypatch, capsys, "lm-eval", "--model", "quiver", "--model_args",
                           "base=tiny-llama,method=base", "--tasks", written[0].name,
                           "--include_path", folder, "--limit", 4, "--batch_size", 4,
                           "--output_path", tmp_path / "out")
    assert code in (0, None), out
    [path] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(path.read_text())
    assert results["results"][written[0].name]["sample_len"] == 4
    assert results["config"]["quiver_method"] == "base"
    report = evaluate_method("base", [TASKS[0]], None, "tiny-llama",
                             EvalConfig(split="all", limit=4), model_and_tokenizer=tiny,
                             show_progress=False)
    assert results["results"][written[0].name]["acc,none"] * 100 == pytest.approx(
        report["tasks"][TASKS[0]]["accuracy"])


def test_the_entry_point_names_the_bridge():
    """lm-eval versions that discover model plugins (the `lm_eval.models` group) find it."""
    from importlib.metadata import entry_points

    [point] = [e for e in entry_points(group="lm_eval.models") if e.name == "quiver"]
    assert point.load() is QuiverLM
    assert lm_eval.api.registry.get_model("quiver") is QuiverLM
    assert lm_eval.api.registry.get_model("hf") is HFLM  # lm-eval's own models still there
