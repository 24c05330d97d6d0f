"""Choosing the next token of one request: greedy, or temperature and top-p sampling.

Each request samples with its own seeded generator, so a seeded request draws the same
tokens whether it runs alone or in a batch with others (its logits being the same).

Every value the fields allow can be honoured: seeds are 64-bit signed integers (what torch's
generator takes), and a temperature below `GREEDY_BELOW` (1e-5) picks the most likely token as
0 does, since dividing logits by it would overflow. Logits are shifted by their maximum before
the division, so any larger temperature gives finite probabilities.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from quiver.errors import QuiverError

GREEDY_BELOW = 1e-5  # temperatures under this are greedy
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed seed


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.0, metadata={
        "help": "0 is greedy; higher samples more freely"})
    top_p: float = field(default=1.0, metadata={
        "help": "sample from the smallest set of tokens whose probability reaches this"})
    seed: int | None = field(default=None, metadata={"help": "seed of the sampling (random "
                                                              "when unset)"})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise QuiverError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise QuiverError(f"temperature must be between 0 and 2, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise QuiverError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise QuiverError(f"seed must be a 64-bit signed integer, not {self.seed}")


class Sampler:
    """The token picker of one request (holds its generator)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = None
        if params.temperature >= GREEDY_BELOW:
            seed = params.seed if params.seed is not None else random.randrange(2**63)
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from one row's logits (vocab,)."""
        if self.generator is None:
            return int(logits.argmax())
        logits = logits.float()
        probs = torch.softmax((logits - logits.max()) / self.params.temperature, dim=-1).cpu()
        if self.params.top_p < 1.0:
            probs = _top_p(probs, self.params.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches `top_p`."""
    ordered, order = probs.sort(descending=True)  # (vocab,)
    before = ordered.cumsum(0) - ordered  # mass of the tokens ranked above each one
    ordered[before >= top_p] = 0.0  # the top token always stays (before = 0)
    return torch.zeros_like(probs).scatter_(0, order, ordered)
