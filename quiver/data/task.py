"""Tasks and examples, and the deterministic train / validation / test split of a task."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from quiver.errors import QuiverError

SPLITS = ("train", "valid", "test", "all")


@dataclass(frozen=True)
class Example:
    """One example: the model reads `prompt` and should produce `target`.

    For multiple choice, `options` lists the candidate continuations and `answer` is the index
    of the correct one (`target == options[answer]`). `references` holds every acceptable
    target of a generative example (the first is `target`).
    """

    prompt: str
    target: str
    options: tuple[str, ...] | None = None
    answer: int | None = None
    references: tuple[str, ...] = ()
    # the source's own record of the example (a reasoning-gym entry), for its scorer
    entry: dict | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.options is not None and (self.answer is None or not self.options):
            raise ValueError("a multiple-choice example needs options and an answer index")


@dataclass(frozen=True)
class SplitConfig:
    """How a task is cut into train / validation / test (fractions of its examples)."""

    seed: int = 0
    valid_fraction: float = 0.1
    test_fraction: float = 0.2
    max_train: int = 10_000
    max_valid: int = 1_000

    def __post_init__(self) -> None:
        if not (0 <= self.valid_fraction < 1 and 0 <= self.test_fraction < 1):
            raise ValueError("split fractions must be in [0, 1)")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("validation and test fractions must leave room for training")


@dataclass
class Task:
    """A named list of examples. `kind` is "mc" (multiple choice) or "gen" (generative).

    `score_answer(answer, example)`, where the source has a scorer of its own (reasoning-gym),
    scores a generated answer from 0 to 1; `metadata["family"]` is the source's category.
    """

    name: str
    examples: list[Example]
    kind: str
    description: str = ""
    metadata: dict = field(default_factory=dict)
    score_answer: Callable[[str, Example], float] | None = field(default=None, repr=False)

    def split(self, part: str, config: SplitConfig = SplitConfig()) -> list[Example]:
        """The examples of one part ("train", "valid", "test" or "all"), always the same for a
        seed.

        The order is a seeded shuffle keyed by the task's name, so adding a task never changes
        another task's split. Test comes first, then validation, then train, so raising the
        train cap never moves an example out of the test set. "all" is every example in that
        shuffled order (uncapped), for tasks no expert trained on: its first n examples are a
        deterministic random sample of the task.
        """
        if part not in SPLITS:
            raise QuiverError(f"unknown split {part!r}: use {', '.join(SPLITS)}")
        order = list(range(len(self.examples)))
        random.Random(config.seed * 1_000_003 + zlib.crc32(self.name.encode())).shuffle(order)
        if part == "all":
            return [self.examples[i] for i in order]
        n = len(order)
        n_test = int(n * config.test_fraction)
        n_valid = min(int(n * config.valid_fraction), config.max_valid)
        if part == "test":
            chosen = order[:n_test]
        elif part == "valid":
            chosen = order[n_test : n_test + n_valid]
        else:
            chosen = order[n_test + n_valid :][: config.max_train]
        return [self.examples[i] for i in chosen]
