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
