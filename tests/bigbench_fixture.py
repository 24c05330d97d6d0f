"""A small BIG-bench in BIG-bench's own file layout, written by the tests themselves.

The registry no longer serves a `bigbench` package with task files, so the BIG-bench reader is
tested on these: `benchmark_tasks/NAME/task.json` in BIG-bench's JSON task format, with the
features the reader must honour (task_prefix, custom input/output/choice prefixes, choices not
appended, target_scores, generative targets with several references, duplicate examples,
parents with subtasks, a parent mixing multiple-choice and generative subtasks) and a
`bbseqio/bigbench_lite.py` naming BIG-bench Lite as BIG-bench's own file does.
"""

from __future__ import annotations

import json
from pathlib import Path

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OBJECTS = ["apple", "banana", "car", "dog", "egg", "fig", "guitar"]
MOVIES = ["Finding Nemo", "The Lion King", "Frozen", "Jaws", "Cars", "Up", "Toy Story"]


def _arithmetic(op: str, digits: int, n: int = 40) -> dict:
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits
    examples = []
    for i in range(n):
        a, b = low + (7 * i + 3) % (high - low), low + (11 * i + 5) % (high - low)
        value = a + b if op == "plus" else a - b
        examples.append({"input": f"What is {a} {op} {b}?", "target": str(value)})
    return {"name": f"{digits}_digit_{'addition' if op == 'plus' else 'subtraction'}",
            "description": f"{digits}-digit {op}", "keywords": ["arithmetic"],
            "metrics": ["exact_str_match"], "examples": examples}


def _true_false(n: int, prefix: str = "") -> list[dict]:
    """Yes-or-no questions whose answer alternates."""
    return [{"input": f"{prefix}Walk {i}: take {i % 5 + 1} steps forward, then "
                      f"{i % 5 + 1 + i % 2} steps backward.",
             "target_scores": {"True": int(i % 2 == 0), "False": int(i % 2 == 1)}}
            for i in range(n)]


def _ordering(objects: int, n: int) -> list[dict]:
    """Multiple choice over `objects` options: which object is the (i mod objects)-th."""
    names = OBJECTS[:objects]
    return [{"input": f"Puzzle {i}: the objects are {', '.join(names)}. Which one is number "
                      f"{i % objects + 1}?",
             "target_scores": {name: int(j == i % objects) for j, name in enumerate(names)}}
            for i in range(n)]


def _emoji(n: int) -> list[dict]:
    """Five of the movies per example, the first of them right."""
    return [{"input": f"What movie does this emoji {i} describe? {'🐟' * (i % 3 + 1)}",
             "target_scores": {MOVIES[(i + j) % len(MOVIES)]: int(j == 0) for j in range(5)}}
            for i in range(n)]


TASKS: dict[str, dict] = {
    "arithmetic": {"description": "arithmetic in words and digits", "keywords": ["math"],
                   "subtasks": [_arithmetic("plus", 1), _arithmetic("minus", 1),
                                _arithmetic("plus", 2)]},
    "navigate": {"description": "Do you end where you started?", "keywords": ["logic"],
                 "task_prefix": "If you follow these instructions, do you return to the "
                                "starting point?",
                 "examples": _true_false(30)},
    "logical_deduction": {"description": "which object is where", "keywords": ["logic"],
                          "subtasks": [{"name": f"{word}_objects", "description": word,
                                        "examples": _ordering(k, size)}
                                       for word, k, size in [("three", 3, 30), ("five", 5, 50),
                                                             ("seven", 7, 50)]]},
    "abstract_narrative_understanding": {
        "description": "narratives", "subtasks": [{
            "name": "4_distractors", "description": "five options",
            "example_input_prefix": "\nNarrative: ", "example_output_prefix": "\nProverb: ",
            "choice_prefix": "\n  option: ", "examples": _ordering(5, 30)}]},
    "object_counting": {"description": "count the objects", "keywords": ["numerical"],
                        "examples": [{"input": f"I have {' and '.join(OBJECTS[:k % 4 + 1])}. "
                                               f"How many objects do I have?",
                                      "target": [str(k % 4 + 1), NUMBERS[k % 4 + 1]]}
                                     for k in range(30)]},
    "emoji_movie": {"description": "guess the movie", "examples": _emoji(40)},
    "winowhy": {"description": "why is it so", "task_prefix": "Is the reason right?\n",
                "examples": _true_false(40)},
    "hindu_knowledge": {"description": "trivia", "append_choices_to_input": False,
                        "examples": _ordering(4, 40)},
    "sports_understanding": {"description": "plausible sports sentences",
                             "examples": _true_false(40, "Plausible? ")},
    "auto_debugging": {"description": "what does the code print",
                       "stop_string": "\n", "output_regex": r"\d+",
                       "examples": [{"input": f"print({i} + 1)", "target": str(i + 1)}
                                    for i in range(30)]},
    "duplicates": {"description": "a task whose examples repeat",
                   "examples": [{"input": "1 + 1", "target": "2"}] * 3
                   + [{"input": f"{i} + 2", "target": str(i + 2)} for i in range(20)]},
    "mixed": {"description": "a parent of a multiple-choice and a generative subtask",
              "subtasks": [{"name": "choose", "examples": _true_false(20)},
                           {"name": "write", "examples": [{"input": f"Say {w}", "target": w}
                                                          for w in NUMBERS]}]},
    "empty_parent": {"description": "neither examples nor subtasks"},
}
LITE = ["emoji_movie", "winowhy", "hindu_knowledge", "auto_debugging", "logical_deduction"]


def write_bigbench(root: Path) -> Path:
    """Write the fixture under `root` (BIG-bench's `bigbench/` layout); returns `root`."""
    tasks = root / "benchmark_tasks"
    for name, spec in TASKS.items():
        spec = dict(spec)
        subtasks = spec.pop("subtasks", [])
        _write(tasks / name / "task.json", {"name": name, **spec})
        for sub in subtasks:
            _write(tasks / name / sub["name"] / "task.json", sub)
    (root / "bbseqio").mkdir(parents=True, exist_ok=True)
    (root / "bbseqio" / "bigbench_lite.py").write_text(
        "BIGBENCH_LITE_TASK_NAMES = {\n    'bigbench_lite_v1': " + repr(LITE) + ",\n}\n")
    return root


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
