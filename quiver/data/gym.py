"""reasoning-gym tasks: procedural generators, each with its own scorer (the embedded suite).

A task is `gym:NAME`, or `gym:NAME?KNOB=VALUE&KNOB=VALUE` with the generator's config knobs
(`gym:basic_arithmetic?max_digits=2`), so one generator gives several related tasks of graded
difficulty. Values are JSON (`2`, `true`, `["+","-"]`) or else plain strings (`natural`).
Two knobs every generator has: `size`, the examples generated (default 1000), and `seed`
(default 0). One knob is quiver's own: `mc=true` scores a task whose answers form a small
closed set (Yes/No, weekdays) as multiple choice over that set.

Examples: the generator's first `size` entries for the seed, with repeated questions dropped,
so train / validation / test (`Task.split`) are disjoint by construction and the same on
every machine. Prompt and target, one format for every generator:

    prompt  = question + "\\nAnswer:"      target = " " + answer   (training adds EOS)

so a trained expert ends its answer with EOS; a generated answer is the text up to EOS, or up
to the first newline for a task whose answers are all one line. The task's family is
reasoning-gym's own category (the package folder of its generator: algebra, arithmetic,
games, ...). `Task.score_answer` is the generator's own `score_answer` (0..1).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from functools import cache
from typing import Any

from quiver.data.task import Example, Task
from quiver.errors import QuiverError

PREFIX = "gym:"
DEFAULT_SIZE = 1000
DEFAULT_SEED = 0
ANSWER_CUE = "\nAnswer:"
MAX_CHOICES = 10  # `mc=true` needs a closed answer set of at most this many answers
_QUIVER_KNOBS = ("mc",)
_NEEDS_CONFIG = ("composite",)  # a generator of generators: nothing to build from a name


def _registry() -> dict[str, tuple[type, type]]:
    """reasoning-gym's generators: name -> (dataset class, config dataclass)."""
    import reasoning_gym  # noqa: F401  (importing it registers every generator)
    from reasoning_gym.factory import DATASETS

    return {n: v for n, v in DATASETS.items() if n not in _NEEDS_CONFIG}


def generator_names() -> list[str]:
    """Every generator quiver can read, sorted."""
    return sorted(_registry())


def family(generator: str) -> str:
    """reasoning-gym's category of a generator: `reasoning_gym.<category>.<module>`."""
    dataset_class, _ = _generator(generator)
    parts = dataset_class.__module__.split(".")
    return parts[1] if len(parts) >= 3 else "other"


def knobs(generator: str) -> dict[str, Any]:
    """The generator's config knobs and their defaults (size and seed as quiver sets them)."""
    _, config_class = _generator(generator)
    values = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
        else:
            values[f.name] = None
    values.update(size=DEFAULT_SIZE, seed=DEFAULT_SEED)
    return {k: _json_safe(v) for k, v in values.items()}


def description(generator: str) -> str:
    """The first line of the generator's docstring."""
    dataset_class, _ = _generator(generator)
    return (dataset_class.__doc__ or "").strip().split("\n")[0]


def parse_name(name: str) -> tuple[str, dict[str, Any]]:
    """`gym:NAME?a=1&b=x` -> ("NAME", {"a": 1, "b": "x"}).

    Raises:
        QuiverError: an unknown generator or knob, or a knob given twice.
    """
    body = name.removeprefix(PREFIX)
    generator, _, query = body.partition("?")
    _generator(generator)
    settings: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, sep, raw = part.partition("=")
        if not sep or not key:
            raise QuiverError(f"task {name!r}: knobs are written KNOB=VALUE, got {part!r}")
        if key in settings:
            raise QuiverError(f"task {name!r}: knob {key!r} is given twice")
        settings[key] = _value(raw)
    allowed = set(knobs(generator)) | set(_QUIVER_KNOBS)
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise QuiverError(f"task {name!r}: {generator} has no knob {', '.join(unknown)} "
                          f"(its knobs: {', '.join(sorted(allowed))})")
    return generator, settings


def canonical_name(generator: str, settings: dict[str, Any]) -> str:
    """One spelling per task: knobs at their defaults left out, the others sorted and their
    values written compactly (`gym:chain_sum?size=1000&max_terms=3` is
    `gym:chain_sum?max_terms=3`)."""
    chosen = _chosen(generator, settings)
    if not chosen:
        return PREFIX + generator
    query = "&".join(f"{k}={_spelling(chosen[k])}" for k in sorted(chosen))
    return f"{PREFIX}{generator}?{query}"


def _chosen(generator: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that differ from their defaults."""
    defaults = {**knobs(generator), "mc": False}
    return {k: v for k, v in settings.items() if defaults.get(k, object()) != v}


def load(name: str) -> Task:
    """Generate `gym:NAME[?KNOBS]`.

    Raises:
        QuiverError: an unknown generator or knob, a value the generator refuses, or `mc=true`
            on a task whose answers are no small closed set.
    """
    generator, settings = parse_name(name)
    as_choice = bool(settings.get("mc", False))
    # only the settings that differ from the defaults: one spelling, one generation
    config = {k: v for k, v in _chosen(generator, settings).items() if k not in _QUIVER_KNOBS}
    dataset, entries = _generate(generator, json.dumps(config, sort_keys=True))
    if all(e["answer"] is None for e in entries):
        raise QuiverError(f"task {name!r}: {generator} gives no reference answers "
                          "(reasoning-gym judges it with a checker), so there is nothing to "
                          "train on or match")
    answers = sorted({str(e["answer"]) for e in entries})
    if as_choice and not 2 <= len(answers) <= MAX_CHOICES:
        raise QuiverError(f"task {name!r}: mc=true needs a closed set of 2 to {MAX_CHOICES} "
                          f"answers; {generator} gave {len(answers)} different answers")
    examples = []
    for entry in entries:
        answer = str(entry["answer"])
        prompt = str(entry["question"]) + ANSWER_CUE
        if as_choice:
            options = tuple(f" {a}" for a in answers)
            examples.append(Example(prompt, f" {answer}", options=options,
                                    answer=answers.index(answer), entry=entry))
        else:
            examples.append(Example(prompt, f" {answer}", references=(answer,), entry=entry))
    one_line = all("\n" not in a for a in answers)
    return Task(
        name=canonical_name(generator, settings),
        examples=examples,
        kind="mc" if as_choice else "gen",
        description=description(generator),
        metadata={"family": family(generator), "generator": generator,
                  "config": {**knobs(generator), **config}, "stop_string": "\n" if one_line
                  else None, "output_regex": None},
        score_answer=lambda answer, example: _score(dataset, answer, example.entry),
    )


def _score(dataset, answer: str, entry: dict) -> float:
    """The generator's own score of `answer`; 0 when its scorer raises on an answer it cannot
    parse (prime_factorization's does on `3 = 6`), as a wrong answer should score."""
    try:
        return float(dataset.score_answer(answer, entry))
    except (ValueError, TypeError, ArithmeticError, IndexError, KeyError, AttributeError):
        return 0.0


@cache
def _generate(generator: str, config_json: str) -> tuple[Any, tuple[dict, ...]]:
    """(the dataset, its entries with repeated questions dropped), once per process."""
    config = {"size": DEFAULT_SIZE, "seed": DEFAULT_SEED, **json.loads(config_json)}
    import reasoning_gym

    entries, seen = [], set()
    try:  # a setting the generator cannot honour may only show while generating
        dataset = reasoning_gym.create_dataset(generator, **config)
        for index in range(len(dataset)):
            entry = dataset[index]
            if entry["question"] not in seen:
                seen.add(entry["question"])
                entries.append(entry)
    except (AssertionError, ValueError, TypeError, IndexError) as err:
        raise QuiverError(f"reasoning-gym refuses {generator} with {config}: {err}") from err
    return dataset, tuple(entries)


def _generator(generator: str) -> tuple[type, type]:
    registry = _registry()
    if generator not in registry:
        hint = (" (it needs a config of generators; use its parts)"
                if generator in _NEEDS_CONFIG else "")
        raise QuiverError(f"unknown reasoning-gym task {generator!r}{hint} "
                          f"(see `quiver tasks ls --source gym`)")
    return registry[generator]


def _json_safe(value: Any) -> Any:
    """A default as JSON can hold it: tuples as lists, enums by value, others as text."""
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if isinstance(value, tuple | list):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _spelling(value: Any) -> str:
    if isinstance(value, str) and _value(value) == value and value.strip() == value:
        return value  # a plain string that reads back as itself
    return json.dumps(value, separators=(",", ":"))
