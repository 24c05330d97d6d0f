"""What an evaluation scores (`EvalConfig`) and what each cell of a transfer matrix measures
(`TransferConfig`); no torch: the command line reads their fields for options and help."""

from __future__ import annotations

from dataclasses import dataclass, field

from quiver.data.task import SPLITS

METRICS = ("loss", "accuracy")  # of a transfer matrix


@dataclass
class EvalConfig:
    """Which examples to score and how."""

    split: str = field(default="test", metadata={
        "help": "train, valid, test, or all (every example: only for tasks no evaluated "
                "expert trained on, unless --allow-seen)"})
    limit: int = field(default=0, metadata={
        "help": "examples per task, at most (0: all); a seeded sample, the same every run"})
    skip: int = field(default=0, metadata={
        "help": "examples of the split's seeded order passed over before the limit: "
                "--skip 200 --limit 40 scores the next 40, disjoint from --limit 200"})
    calibrate: bool = field(default=False, metadata={
        "help": "multiple choice: also score each option against its log-probability after "
                "a content-free prompt (one more pass per distinct option set)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "generation length, at most"})

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}")
        if self.limit < 0 or self.skip < 0:
            raise ValueError("limit and skip must be >= 0")


@dataclass
class TransferConfig:
    """What each cell of the transfer matrix measures."""

    metric: str = field(default="loss", metadata={"help": "loss (mean target-token loss) or "
                                                          "accuracy (MC accuracy / exact match)"})
    split: str = field(default="valid", metadata={
        "help": "train, valid, test, or all (every example, for tasks no expert saw)"})
    limit: int = field(default=0, metadata={"help": "examples per task, at most (0: all)"})
    skip: int = field(default=0, metadata={
        "help": "examples of the split's seeded order passed over first (a disjoint sample)"})
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (prompt cut)"})

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}: use loss or accuracy")
        if self.split not in ("train", "valid", "test", "all"):
            raise ValueError(f"unknown split {self.split!r}")
        if self.limit < 0 or self.skip < 0 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError("limit and skip must be >= 0, batch_size positive, max_length "
                             "at least 8")
