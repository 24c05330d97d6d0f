import pytest
import torch

from quiver.data import Example, Task, bigbench
from quiver.data.batching import split_trailing_space
from quiver.errors import QuiverError
from quiver.evaluation import EvalConfig, evaluate, generate_answers, score_choices
from quiver.evaluation.metrics import exact_match, rouge_l
from quiver.evaluation.scoring import BIGBENCH_DEFAULT_REGEX, postprocess, score_choices_batch


def _brute_force_log_prob(model, tokenizer, prompt, option):
    stripped, continuation = split_trailing_space(prompt, option)
    p = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    o = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + o])
    log_probs = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(log_probs[len(p) - 1 + j, tok].item() for j, tok in enumerate(o))


def test_choice_scores_equal_full_sequence_log_probs(tiny):
    model, tokenizer = tiny
    example = Example("Q: Is the sky blue?\nA: ", "yes", options=("yes", "no", "it depends on it"),
                      answer=0)
    scores = score_choices(model, tokenizer, example)
    for option, got in zip(example.options, scores.log_probs, strict=True):
        assert got == pytest.approx(_brute_force_log_prob(model, tokenizer, example.prompt,
                                                          option), abs=1e-3)
    assert scores.n_tokens[2] > scores.n_tokens[0]


def test_batched_choice_scores_equal_full_sequence_log_probs(tiny):
    """Several examples at once (left-padded prompts of different lengths, options of
    different counts and lengths) give every example's own log-probabilities."""
    model, tokenizer = tiny
    examples = [
        Example("Q: Is the sky blue?\nA: ", "yes", options=("yes", "no"), answer=0),
        Example("A much longer question about rivers, stones and clouds, asked twice?\nA:",
                "x", options=(" a river", " stone", " the clouds above us all"), answer=2),
        Example("2+2=", "4", options=("4", "5", "22", "four"), answer=0),
    ]
    batched = score_choices_batch(model, tokenizer, examples)
    for example, scores in zip(examples, batched, strict=True):
        for option, got in zip(example.options, scores.log_probs, strict=True):
            assert got == pytest.approx(_brute_force_log_prob(model, tokenizer, example.prompt,
                                                              option), abs=1e-3)
        assert scores.n_tokens == score_choices(model, tokenizer, example).n_tokens


# BIG-bench's `postprocess_output` (models/model_utils.py): cut after the first stop string
# (keeping it) when it is not at the start, then keep the first match of the regex; quiver
# strips the result. The cases and their outputs by that definition:
POSTPROCESSED = [("Paris. And more", None, BIGBENCH_DEFAULT_REGEX, "Paris"),
                 (" 42\nnext", None, BIGBENCH_DEFAULT_REGEX, "42"),
                 ("yes; no", None, BIGBENCH_DEFAULT_REGEX, "yes"),
                 ("a b STOP c", "STOP", None, "a b STOP"),
                 ("STOP a b", "STOP", None, "STOP a b"),  # a stop string at 0 cuts nothing
                 ("= 42. 7*7", None, r"\d+", "42"),
                 ("", None, BIGBENCH_DEFAULT_REGEX, "")]


@pytest.mark.parametrize("text, stop, regex, expected", POSTPROCESSED)
def test_postprocess_matches_bigbench(text, stop, regex, expected):
    assert postprocess(text, stop, regex) == expected


def test_exact_match_matches_bigbench_and_rouge_matches_rouge_score():
    """BIG-bench's exact_str_match (api/task_metrics.py) counts a response that is one of
    its targets, case and spaces included: here 2 of 3."""
    targets = [["Paris", "paris"], ["4"], ["blue"]]
    answers = ["Paris", "5", "blue"]
    ours = [exact_match(a, tuple(t)) for a, t in zip(answers, targets, strict=True)]
    assert ours == [1.0, 0.0, 1.0]
    assert exact_match("paris ", ("Paris",)) == 0.0
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = 100 * max(scorer.score(r, "the cat sat")["rougeL"].fmeasure
                         for r in ("a cat sat down", "the dog"))
    assert rouge_l("the cat sat", ("a cat sat down", "the dog")) == pytest.approx(expected)


def test_batched_generation_equals_one_by_one(tiny):
    model, tokenizer = tiny
    examples = [Example("Repeat: apple\nAnswer:", "apple"), Example("Q: 2+2\nA: ", "4"),
                Example("A much longer prompt about many things, rivers and stones:", "x")]
    batched = generate_answers(model, tokenizer, examples, 5, output_regex=None)
    single = [generate_answers(model, tokenizer, [e], 5, output_regex=None)[0] for e in examples]
    assert batched == single


def test_evaluate_reports_per_task_metrics_and_average(tiny):
    model, tokenizer = tiny
    mc = Task("toy:mc", [Example(f"Q{i}: pick\nA: ", "a", options=("a", "b b"), answer=i % 2)
                         for i in range(20)], kind="mc")
    gen = Task("toy:gen", [Example(f"Say {i}:", f" {i}", references=(f"{i}",))
                           for i in range(20)], kind="gen")
    report = evaluate(model, tokenizer, [mc, gen], EvalConfig(limit=3, max_new_tokens=4),
                      show_progress=False)
    assert report["tasks"]["toy:mc"]["examples"] == 3
    assert 0 <= report["tasks"]["toy:mc"]["accuracy"] <= 100
    assert set(report["tasks"]["toy:gen"]) >= {"exact_match", "rougeL", "answers"}
    assert report["average"]["accuracy"] == report["tasks"]["toy:mc"]["accuracy"]
    with pytest.raises(QuiverError, match="no examples in its test split"):
        evaluate(model, tokenizer, [Task("toy:tiny", [Example("a", "b")], kind="gen")],
                 show_progress=False)


def test_eval_config_rejects_unknown_split():
    with pytest.raises(ValueError):
        EvalConfig(split="dev")


def test_bigbench_tasks_carry_their_output_regex():
    task = bigbench.load("bigbench:object_counting")  # neither set: BIG-bench's default
    assert task.metadata["output_regex"] == BIGBENCH_DEFAULT_REGEX
    assert task.metadata["stop_string"] is None
    task = bigbench.load("bigbench:auto_debugging")
    assert (task.metadata["stop_string"], task.metadata["output_regex"]) == ("\n", r"\d+")


def test_char_norm_and_calibrated_predictions_follow_their_formulas(tiny):
    """acc_norm as lm-evaluation-harness defines it (log-probability per character of the
    option) and content-free calibration (minus the option's log-probability after
    "N/A" and the answer cue), recomputed here from brute-force log-probabilities."""
    model, tokenizer = tiny
    examples = [Example(f"Q: item {i} is?\nA: ", "x", options=("x", "yy yy", "zzz"),
                        answer=i % 3) for i in range(9)]
    task = Task("toy:calibrate", examples, kind="mc")
    report = evaluate(model, tokenizer, [task], EvalConfig(split="all", calibrate=True),
                      show_progress=False)["tasks"]["toy:calibrate"]
    order = task.split("all")
    free = [_brute_force_log_prob(model, tokenizer, "N/A\nA: ", o) for o in order[0].options]
    for e, char_hit, calibrated_hit in zip(order, report["per_example"]["accuracy_char_norm"],
                                           report["per_example"]["accuracy_calibrated"],
                                           strict=True):
        log_probs = [_brute_force_log_prob(model, tokenizer, e.prompt, o) for o in e.options]
        per_char = [lp / len(o) for lp, o in zip(log_probs, e.options, strict=True)]
        shifted = [lp - f for lp, f in zip(log_probs, free, strict=True)]
        assert char_hit == float(max(range(3), key=per_char.__getitem__) == e.answer)
        assert calibrated_hit == float(max(range(3), key=shifted.__getitem__) == e.answer)
    assert report["accuracy_calibrated"] == pytest.approx(
        100 * sum(report["per_example"]["accuracy_calibrated"]) / 9)
    assert "accuracy_calibrated" not in evaluate(
        model, tokenizer, [task], EvalConfig(split="all"), show_progress=False)["average"]


def test_prediction_shares_count_options_by_text_or_position(tiny):
    model, tokenizer = tiny
    fixed = Task("toy:fixed", [Example(f"Q{i}\nA: ", "yes", options=("yes", "no"), answer=0)
                               for i in range(10)], kind="mc")
    report = evaluate(model, tokenizer, [fixed], EvalConfig(split="all"),
                      show_progress=False)["tasks"]["toy:fixed"]
    predictions = report["per_example"]["prediction"]
    assert report["answer_share"] == {"yes": 100.0}
    assert report["prediction_share"].get("yes", 0) == pytest.approx(
        100 * predictions.count(0) / 10)
    assert sum(report["prediction_share"].values()) == pytest.approx(100)
    many = Task("toy:many", [Example(f"Q{i}\nA: ", f"o{i}", options=(f"o{i}", f"p{i}"),
                                     answer=0) for i in range(12)], kind="mc")
    shares = evaluate(model, tokenizer, [many], EvalConfig(split="all"),
                      show_progress=False)["tasks"]["toy:many"]["answer_share"]
    assert shares == {"#0": 100.0}  # 24 distinct texts: counted by position


def test_skip_gives_a_disjoint_sample_after_the_limit(tiny):
    model, tokenizer = tiny
    task = Task("toy:skip", [Example(f"Q{i}\nA: ", "a", options=("a", "b"), answer=0)
                             for i in range(10)], kind="mc")
    first = evaluate(model, tokenizer, [task], EvalConfig(split="all", limit=4),
                     show_progress=False)["tasks"]["toy:skip"]
    rest = evaluate(model, tokenizer, [task], EvalConfig(split="all", skip=4),
                    show_progress=False)["tasks"]["toy:skip"]
    assert (first["examples"], rest["examples"]) == (4, 6)
    with pytest.raises(QuiverError, match="after skipping 10"):
        evaluate(model, tokenizer, [task], EvalConfig(split="all", skip=10), show_progress=False)
    with pytest.raises(ValueError):
        EvalConfig(skip=-1)
