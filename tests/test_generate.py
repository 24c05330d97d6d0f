"""The serving engine against one-at-a-time references, and `quiver generate`.

Every served name (base, arrow, uniform, each expert, a merge) in one batch, and again
through a batch of 3 rows that requests leave and join between steps, must give the tokens
and logits of that request run alone with `quiver.reuse` (or the bare model) and
`model.generate`.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from quiver.cli import app
from quiver.models import load_base
from quiver.serving import Engine, EngineConfig, SamplingParams, serve_library
from quiver.serving.generate import stop_ids
from quiver.serving.text import TextStream
from tests.conftest import SERVED_NAMES, SERVED_PROMPTS, SERVED_STEPS

PROMPTS, NAMES, STEPS = SERVED_PROMPTS, SERVED_NAMES, SERVED_STEPS


@pytest.fixture(scope="module")
def served(served_library):
    model, tokenizer = load_base("tiny-llama", device="cpu")  # a model of its own to attach to
    return serve_library(model, tokenizer, served_library)


@pytest.mark.parametrize("max_batch", [32, 3])
def test_batched_rows_match_one_at_a_time(served, served_references, max_batch):
    engine = Engine(served, EngineConfig(max_batch=max_batch)).start()
    combos = [(n, p) for n in NAMES for p in PROMPTS]
    # different lengths: with 3 rows, requests leave and join the batch between steps
    budgets = [STEPS if max_batch > 3 else 2 + i % 4 for i in range(len(combos))]
    try:
        events = engine.generate([(served.tokenizer(p).input_ids, served.route(n),
                                   SamplingParams(max_new_tokens=b))
                                  for (n, p), b in zip(combos, budgets, strict=True)],
                                 keep_logits=True)
    finally:
        engine.stop()
    assert engine.max_rows_seen == min(max_batch, len(combos))
    for combo, budget, got in zip(combos, budgets, events, strict=True):
        tokens, logits = served_references[combo]
        assert [e.token for e in got] == tokens[:budget], combo
        assert got[-1].finish == "length"
        torch.testing.assert_close(torch.stack([e.logits for e in got]), logits[:budget],
                                   atol=1e-4, rtol=1e-4)
    # the routes differ: the experts change what the base model says
    assert len({tuple(served_references[(n, PROMPTS[0])][0]) for n in NAMES}) == len(NAMES)


def test_seeded_sampling_is_the_same_alone_and_batched(served):
    ids = served.tokenizer(PROMPTS[0]).input_ids
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    engine = Engine(served).start()
    try:
        (alone,) = engine.generate([(ids, served.route("arrow"), sampling)])
        batched = engine.generate([(ids, served.route("arrow"), sampling),
                                   (ids, served.route("expert:a"), sampling)])
    finally:
        engine.stop()
    assert [e.token for e in alone] == [e.token for e in batched[0]]


def test_text_stream_holds_split_characters_and_cuts_stop_strings(tiny):
    tokenizer = tiny[1]
    text = "Café 🎉 naïve ends here. STOP and more"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    whole = TextStream(tokenizer)
    assert "".join(whole.add(t) for t in ids) + whole.flush() == text
    stream = TextStream(tokenizer, stops=["STOP", "zzz"])
    deltas = [stream.add(t) for t in ids]
    assert "".join(deltas) + stream.flush() == "Café 🎉 naïve ends here. "
    assert stream.stopped and "\ufffd" not in "".join(deltas)


def test_generate_cli(served_library, served, served_references):
    runner = CliRunner()
    url = served_library.url
    expected = served.tokenizer.decode(served_references[("expert:ab", PROMPTS[0])][0])
    result = runner.invoke(app, ["generate", PROMPTS[0], "--library", url, "--expert", "ab",
                                 "--max-new-tokens", str(STEPS)])
    assert result.exit_code == 0, result.output
    assert result.output == expected + "\n"
    sampled = ["generate", "Hi", "--library", url, "--method", "uniform", "--chat",
               "--temperature", "0.8", "--seed", "3", "--max-new-tokens", "4"]
    first, second = runner.invoke(app, sampled), runner.invoke(app, sampled)
    assert first.exit_code == 0 and first.output == second.output
    assert stop_ids(served) == {served.tokenizer.eos_token_id}
    bad = runner.invoke(app, ["generate", "Hi", "--library", url, "--expert", "nope"])
    assert bad.exit_code != 0


class _Poison:
    """Makes every row that asked for `expert:c` fail inside the forward pass, the other rows
    untouched: its tokens' routing weights become NaN (`nan`), or the routing raises when such
    a row is in the pass (`raise`), in the prefill passes (`prefill`) or once decoding has
    begun (`decode`)."""

    def __init__(self, served, how: str, when: str) -> None:
        self.context, self.how, self.when = served.context, how, when
        self.poisoned = served.route("expert:c")
        self.rows, self.per_row = [], 1
        self.set_rows, self.route = self.context.set_rows, self.context.route
        self.context.set_rows, self.context.route = self._set_rows, self._route

    def undo(self) -> None:
        del self.context.set_rows, self.context.route

    def _set_rows(self, routes, tokens_per_row):
        self.rows, self.per_row = list(routes), tokens_per_row
        self.set_rows(routes, tokens_per_row)

    def _route(self, layer, x, projections=None):
        weights, indices = self.route(layer, x, projections)
        bad = [r for r, route in enumerate(self.rows) if route == self.poisoned]
        if not bad or (self.per_row > 1) != (self.when == "prefill"):
            return weights, indices
        if self.how == "raise":
            raise RuntimeError("poisoned routing")
        tokens = torch.tensor([r * self.per_row + j for r in bad for j in range(self.per_row)])
        weights = weights.clone()
        weights[tokens] = float("nan")
        return weights, indices


@pytest.mark.parametrize("how", ["nan", "raise"])
@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_poisoned_row_fails_alone(served, served_references, how, when):
    """Rows of `expert:c` fail in the forward pass beside healthy rows of every other name:
    they end alone with an error; every healthy row gives, token by token, what it gives
    alone (and the engine serves on)."""
    healthy = [(n, p) for n in NAMES if n != "expert:c" for p in PROMPTS[:2]]
    # prompts of several tokens: a pass of one token per row is a decoding pass to _Poison
    combos = [("expert:c", PROMPTS[0])] + healthy + [("expert:c", PROMPTS[2])]
    poison = _Poison(served, how, when)
    engine = Engine(served, EngineConfig(max_batch=6)).start()  # newcomers join mid-way
    try:
        events = engine.generate([(served.tokenizer(p).input_ids, served.route(n),
                                   SamplingParams(max_new_tokens=STEPS)) for n, p in combos],
                                 keep_logits=True)
    finally:
        poison.undo()
    try:
        (after,) = engine.generate([(served.tokenizer(PROMPTS[0]).input_ids,
                                     served.route("expert:c"), SamplingParams(max_new_tokens=2))])
    finally:
        engine.stop()
    for combo, got in zip(combos, events, strict=True):
        if combo[0] == "expert:c":
            assert got[-1].finish == "error"
            assert ("NaN" if how == "nan" else "poisoned routing") in got[-1].error
            assert len(got) == (1 if when == "prefill" else 2)  # decode: one token, then it
            continue
        tokens, logits = served_references[combo]
        assert [e.token for e in got] == tokens, combo
        torch.testing.assert_close(torch.stack([e.logits for e in got]), logits,
                                   atol=1e-4, rtol=1e-4)
    assert [e.token for e in after] == served_references[("expert:c", PROMPTS[0])][0][:2]


def test_a_failing_sampler_fails_its_row_alone(served, served_references, monkeypatch):
    """A row whose sampling raises ends alone; a temperature too small to divide by is
    greedy, and a seed beyond 64 bits is refused before it reaches the engine."""
    from quiver.errors import QuiverError
    from quiver.serving import sampling

    ids = served.tokenizer(PROMPTS[0]).input_ids
    broken = SamplingParams(max_new_tokens=STEPS, temperature=1.0, seed=11)
    tiny_temperature = SamplingParams(max_new_tokens=STEPS, temperature=1e-45, seed=5)
    real_call = sampling.Sampler.__call__

    def call(self, logits):
        if self.params is broken:
            raise RuntimeError("sampling broke")
        return real_call(self, logits)

    monkeypatch.setattr(sampling.Sampler, "__call__", call)
    engine = Engine(served).start()
    try:
        bad, greedy, plain = engine.generate([(ids, served.route("arrow"), broken),
                                              (ids, served.route("arrow"), tiny_temperature),
                                              (ids, served.route("base"),
                                               SamplingParams(max_new_tokens=STEPS))])
    finally:
        engine.stop()
    assert [e.finish for e in bad] == ["error"] and "sampling broke" in bad[0].error
    assert [e.token for e in greedy] == served_references[("arrow", PROMPTS[0])][0]
    assert [e.token for e in plain] == served_references[("base", PROMPTS[0])][0]
    with pytest.raises(QuiverError, match="64-bit"):
        SamplingParams(seed=2**64)
