"""The options of `quiver adapt` (few-shot adaptation of a new task from a library)."""

from __future__ import annotations

from dataclasses import dataclass, field

# method -> what it starts from: nothing, a Poly/MHR entry, or a library of LoRA experts
METHODS = {
    "private": None,
    "mhr-z": "poly",
    "mhr-full": "poly",
    "mhr-mu": "poly",
    "polylib": "library",
    "polylib-full": "library",
    "lib-mu": "library",
    "lorahub": "library",
}


@dataclass
class AdaptConfig:
    """How to adapt to a new task from a few examples. The training options (steps, lr, rank
    of `private`, seed, ...) are the `TrainConfig`'s; its seed also draws the shots."""

    method: str = field(metadata={
        "help": "private (a new LoRA), mhr-z (a new routing row over a Poly/MHR entry, skills "
                "frozen), mhr-full (row and skills), mhr-mu (the entry's skills averaged into "
                "one LoRA, fine-tuned), polylib (a Poly router over a library's LoRA experts, "
                "experts frozen), polylib-full (router and experts), lib-mu (the library's "
                "average, fine-tuned), lorahub (one weight per expert, gradient-free search)"})
    shots: int = field(metadata={
        "help": "training examples of the task, a seeded sample of its training split"})
    source: str = field(default="", metadata={
        "flag": "--from",
        "help": "mhr-*: a Poly/MHR entry of --library; polylib*, lib-mu, lorahub: a library "
                "(folder or URL) whose LoRA experts are used; private: none"})
    routing_lr: float = field(default=0.1, metadata={
        "help": "mhr-z, mhr-full, polylib, polylib-full: peak learning rate of the routing "
                "logits (the rest learns at --lr)"})
    lorahub_budget: int = field(default=40, metadata={
        "help": "lorahub: evaluations of the loss the search may make (LoraHub: 40)"})
    lorahub_l1: float = field(default=0.05, metadata={
        "help": "lorahub: weight of the L1 penalty on the expert weights (LoraHub: 0.05)"})
    lorahub_bound: float = field(default=1.5, metadata={
        "help": "lorahub: each weight is searched in [-bound, bound] (LoraHub: 1.5)"})
    lorahub_examples: int = field(default=0, metadata={
        "help": "lorahub: each candidate's loss is measured on at most this many of the "
                "shots (the first ones); 0: all of them (LoraHub's paper searches on 5)"})
    lorahub_sigma: float = field(default=0.5, metadata={
        "help": "lorahub: the search's initial step size around the start (all weights "
                "0; nevergrad's default is 1)"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.shots < 1:
            raise ValueError("shots must be at least 1")
        if self.routing_lr <= 0 or self.lorahub_budget < 1 or self.lorahub_l1 < 0:
            raise ValueError("routing_lr must be positive, lorahub_budget at least 1 and "
                             "lorahub_l1 at least 0")
        if self.lorahub_examples < 0:
            raise ValueError("lorahub_examples must be at least 0 (0: all the shots)")
        if self.lorahub_bound <= 0 or self.lorahub_sigma <= 0:
            raise ValueError("lorahub_bound and lorahub_sigma must be positive")
