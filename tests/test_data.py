from pathlib import Path

import pytest

from quiver.data import Example, SplitConfig, Task, bigbench, load_task
from quiver.errors import QuiverError

# The second example of fixture tasks (tests/bigbench_fixture.py) as BIG-bench's own
# `default_format_fn` (api/json_task.py, run once on these files) formats it: prompt (the
# task_prefix, then its input), target, and options in BIG-bench's order.
BIGBENCH_FORMATTED = {
    "bigbench:arithmetic/1_digit_addition": ("\nQ: What is 0 plus 6?\nA: ", "6", None),
    "bigbench:navigate": (
        "If you follow these instructions, do you return to the starting point?\nQ: Walk 1: "
        "take 2 steps forward, then 3 steps backward.\n  choice: True\n  choice: False\nA: ",
        "False", ["True", "False"]),
    "bigbench:abstract_narrative_understanding/4_distractors": (
        "\nNarrative: Puzzle 1: the objects are apple, banana, car, dog, egg. Which one is "
        "number 2?\n  option: banana\n  option: egg\n  option: car\n  option: apple\n  "
        "option: dog\nProverb: ", "banana", ["apple", "banana", "car", "dog", "egg"]),
    "bigbench:hindu_knowledge": (  # append_choices_to_input: false
        "\nQ: Puzzle 1: the objects are apple, banana, car, dog. Which one is number 2?\nA: ",
        "banana", ["apple", "banana", "car", "dog"]),
    "bigbench:winowhy": (
        "Is the reason right?\n\nQ: Walk 1: take 2 steps forward, then 3 steps backward.\n  "
        "choice: True\n  choice: False\nA: ", "False", ["True", "False"]),
}


@pytest.mark.parametrize("name", list(BIGBENCH_FORMATTED))
def test_bigbench_prompts_match_bigbench_own_formatting(name):
    prompt, target, options = BIGBENCH_FORMATTED[name]
    example = load_task(name).examples[1]
    assert (example.prompt, example.target) == (prompt, target)
    assert (list(example.options) if example.options else None) == options
    if options:
        assert example.options[example.answer] == example.target


def test_bigbench_is_optional_and_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv(bigbench.ENV_DIR, str(tmp_path / "nothing"))
    monkeypatch.setattr(bigbench.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QuiverError, match="pip install --no-deps 'bigbench @ git"):
        load_task("bigbench:navigate")
    assert load_task("gym:chain_sum?size=20").name == "gym:chain_sum?size=20"  # no BIG-bench


def test_bigbench_folder_is_bigbench_s_folder_or_its_benchmark_tasks(bigbench_files,
                                                                     monkeypatch):
    for folder in (bigbench_files, bigbench_files / "benchmark_tasks"):
        monkeypatch.setenv(bigbench.ENV_DIR, str(folder))
        assert bigbench.tasks_root() == bigbench_files / "benchmark_tasks"


def test_bigbench_generative_task_keeps_all_references():
    task = load_task("bigbench:object_counting")
    assert task.kind == "gen" and task.examples[0].options is None
    assert task.examples[0].references == ("1", "one")
    assert task.examples[0].references[0] == task.examples[0].target


def test_bigbench_drops_repeated_examples():
    assert len(load_task("bigbench:duplicates").examples) == 21


def test_bigbench_parent_is_union_of_subtasks_and_bare_names_work():
    parent = load_task("logical_deduction")
    subs = [load_task(f"bigbench:logical_deduction/{n}_objects")
            for n in ("five", "seven", "three")]  # subtasks in name order
    assert parent.name == "bigbench:logical_deduction" and parent.kind == "mc"
    assert len(parent.examples) == sum(len(s.examples) for s in subs) == 130
    assert parent.examples == [e for s in subs for e in s.examples]


def test_bigbench_mixed_parent_generates_on_every_example():
    task = load_task("bigbench:mixed")
    assert task.kind == "gen" and len(task.examples) == 30
    assert all(e.options is None and e.references[0] == e.target for e in task.examples)


def test_bigbench_subtask_names_are_listed():
    names = bigbench.task_names()
    assert "bigbench:arithmetic/1_digit_addition" in names
    assert "bigbench:arithmetic" in names and len(names) == 22


def test_bigbench_task_with_neither_examples_nor_subtasks_is_refused():
    with pytest.raises(QuiverError, match="neither examples nor subtasks"):
        load_task("bigbench:empty_parent")


@pytest.mark.parametrize("bad", ["bigbench:no_such_task", "no_such_task", "bigbench:../..", ""])
def test_unknown_task_is_a_clear_error(bad):
    with pytest.raises(QuiverError, match="unknown"):
        load_task(bad)


def test_splits_are_deterministic_disjoint_and_capped():
    task = Task("t", [Example(f"p{i}", f"t{i}") for i in range(1000)], kind="gen")
    config = SplitConfig(max_train=500, max_valid=50)
    parts = {p: [e.prompt for e in task.split(p, config)] for p in ("train", "valid", "test")}
    assert len(parts["test"]) == 200 and len(parts["valid"]) == 50 and len(parts["train"]) == 500
    assert not set(parts["train"]) & set(parts["test"])
    assert not set(parts["valid"]) & (set(parts["test"]) | set(parts["train"]))
    assert parts["test"] == [e.prompt for e in task.split("test", config)]
    other_seed = [e.prompt for e in task.split("test", SplitConfig(seed=1))]
    assert other_seed != parts["test"]
    # raising the train cap never moves an example out of the test split
    assert [e.prompt for e in task.split("test", SplitConfig())] == parts["test"]


def test_split_all_is_every_example_in_a_seeded_order():
    task = Task("t", [Example(f"p{i}", f"t{i}") for i in range(300)], kind="gen")
    every = [e.prompt for e in task.split("all")]
    assert sorted(every) == sorted(e.prompt for e in task.examples)  # uncapped, no repeats
    assert every == [e.prompt for e in task.split("all")]  # deterministic
    assert every[:10] != [f"p{i}" for i in range(10)]  # shuffled: a prefix is a sample
    assert every[:60] == [e.prompt for e in task.split("test")]  # test is its first part
    with pytest.raises(QuiverError, match="unknown split"):
        task.split("dev")


def test_jsonl_reader_reads_generative_and_multiple_choice(tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"prompt": "2+2=", "target": "4"}\n\n{"prompt": "3+3=", "target": "6"}\n')
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"prompt": "Sky?", "options": ["blue", "red"], "answer": 0}\n')
    task = load_task(f"jsonl:{gen}")
    assert task.kind == "gen" and [e.target for e in task.examples] == ["4", "6"]
    task = load_task(f"jsonl:{mc}")
    assert task.kind == "mc" and task.examples[0].target == "blue"


@pytest.mark.parametrize("line, message", [
    ("not json", "not a valid example"),
    ('{"target": "x"}', "not a valid example"),
    ('{"prompt": "p", "options": ["a"], "answer": 3}', "not an index"),
])
def test_jsonl_reader_rejects_bad_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(QuiverError, match=message):
        load_task(f"jsonl:{path}")


def test_empty_task_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(QuiverError, match="no usable examples"):
        load_task(f"jsonl:{path}")


def test_hf_flan_layout_dataset_from_disk(tmp_path):
    import datasets

    rows = {"source": ["a1", "b1", "a2"], "target": ["A1", "B1", "A2"],
            "task_name": ["task_a", "task_b", "task_a"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "flan"))
    task = load_task(f"hf:{tmp_path / 'flan'}#task_a")
    assert [(e.prompt, e.target) for e in task.examples] == [("a1", "A1"), ("a2", "A2")]
    from quiver.data import hf

    assert hf.task_names(f"hf:{tmp_path / 'flan'}") == [
        f"hf:{tmp_path / 'flan'}#task_a", f"hf:{tmp_path / 'flan'}#task_b"]
    with pytest.raises(QuiverError, match="no usable examples"):
        load_task(f"hf:{tmp_path / 'flan'}#task_c")


def test_hf_dataset_without_flan_columns_is_refused(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(QuiverError, match="Flan columns"):
        load_task(f"hf:{tmp_path / 'plain'}")
    with pytest.raises(QuiverError, match="cannot open dataset"):
        load_task(f"hf:{Path(tmp_path) / 'missing'}")
