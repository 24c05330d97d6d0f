"""`quiver serve` in a subprocess on 127.0.0.1, driven by the official `openai` client.

One server (API key required, 8 rows per batch, 32 requests accepted at once) serves the
random-expert library of conftest; its answers are compared with the one-at-a-time references
of tests/test_generate.py.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from benchmarks.local_server import ServerNotUp, free_port, wait_until_healthy, wait_until_idle
from tests.conftest import SERVED_PROMPTS

KEY = "test-key"
TOKENS = 4


@pytest.fixture(scope="module")
def server(served_library):
    port = free_port()
    env = {**os.environ, "QUIVER_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "quiver.cli", "serve", "--library", served_library.url,
         "--port", str(port), "--max-batch", "8", "--max-concurrent", "32",
         "--max-tokens", "256", "--max-prompt-tokens", "64"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_healthy(port, process, timeout=120)
    except ServerNotUp as err:
        process.kill()
        pytest.fail(f"{err}: {process.stderr.read().decode()}")
    yield port
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def expected(tiny, served_references):
    """The text of each (model, prompt) decoded greedily one request at a time."""
    return {combo: tiny[1].decode(tokens[:TOKENS])
            for combo, (tokens, _) in served_references.items()}


def test_models_completions_and_chat(client, expected):
    assert [m.id for m in client.models.list()] == ["base", "arrow", "uniform", "expert:a",
                                                    "expert:ab", "expert:b", "expert:c"]
    prompt = SERVED_PROMPTS[0]
    done = client.completions.create(model="expert:ab", prompt=prompt, max_tokens=TOKENS,
                                     temperature=0)
    assert done.choices[0].text == expected[("expert:ab", prompt)]
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == TOKENS
    chunks = list(client.completions.create(model="arrow", prompt=prompt, max_tokens=TOKENS,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected[("arrow", prompt)]
    assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="uniform", messages=messages, max_tokens=TOKENS,
                                          temperature=0)
    streamed = list(client.chat.completions.create(
        model="uniform", messages=messages, max_tokens=TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert streamed[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content and len(text) > 0
    assert streamed[-1].usage.completion_tokens == TOKENS


def test_errors_in_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="../../etc/passwd", prompt="Hi")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="base", prompt="Hi " * 100)
    assert err.value.body["code"] == "context_length_exceeded"
    for bad in [{"max_tokens": 257}, {"temperature": 5}, {"top_p": 0}, {"n": 2}]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="base", prompt="Hi", **bad)
        assert err.value.body["param"] == next(iter(bad))
    for key in ["wrong", None]:
        connection = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        connection.request("GET", "/v1/models", headers=headers)
        response = connection.getresponse()
        assert response.status == 401
        assert json.loads(response.read())["error"]["code"] == "invalid_api_key"
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    connection.request("POST", "/v1/completions", body=b'{"model": "base", "prompt": ',
                       headers={"Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 400
    assert set(json.loads(response.read())["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param", [
    ({"seed": 2**64, "temperature": 0.7}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (b'{"model": "base", "prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}", None),
    (b"[" * 100_000, None),
    (b'{"model": "base", "prompt": "Hi", "top_p": NaN}', None),
    (b'"just a string"', None),
])
def test_out_of_range_and_malformed_bodies_are_400_on_a_connection_that_stays(
        server, expected, body, param):
    """Each bad body is a 400 in OpenAI's shape naming the field, never a 500, and the same
    keep-alive connection then answers a valid request (a temperature of 1e-45 is greedy)."""
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if isinstance(body, dict):
        body = json.dumps({"model": "base", "prompt": "Hi", **body}).encode()
    connection.request("POST", "/v1/completions", body=body, headers=headers)
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 400 and error["param"] == param, error
    assert response.getheader("connection") != "close" and response.getheader("x-request-id")
    prompt = SERVED_PROMPTS[0]
    connection.request("POST", "/v1/completions", headers=headers, body=json.dumps(
        {"model": "expert:ab", "prompt": prompt, "max_tokens": TOKENS, "temperature": 1e-45,
         "seed": 3}).encode())
    response = connection.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["choices"][0]["text"] == expected[("expert:ab", prompt)]
    connection.close()


def test_a_body_that_says_it_is_not_json_is_400(server):
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    connection.request("POST", "/v1/completions", body=b'{"model": "base", "prompt": "Hi"}',
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    response = connection.getresponse()
    assert response.status == 400
    assert "application/json" in json.loads(response.read())["error"]["message"]


def test_full_server_answers_429_and_disconnects_free_slots(client, server):
    streams = [client.completions.create(model="base", prompt="Hi", max_tokens=256,
                                         temperature=0, stream=True) for _ in range(32)]
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="base", prompt="Hi", max_tokens=1)
    for stream in streams:
        stream.close()
    assert wait_until_idle(server)["accepted"] == 0


def test_load_300_requests_32_clients_some_cancelled(client, server, expected):
    """300 requests over every (model, prompt), 32 at a time; every 7th is streamed and
    dropped after its first chunk. Every other request gets its one-at-a-time answer.
    A client may be answered 429 for a moment after dropping a stream (the server has not
    seen the disconnection yet): it retries, as OpenAI's client does."""
    combos = list(expected)
    client = client.with_options(max_retries=5)

    def one(i: int):
        name, prompt = combos[i % len(combos)]
        if i % 7 == 3:
            stream = client.completions.create(model=name, prompt=prompt, max_tokens=200,
                                               temperature=0, stream=True)
            next(iter(stream))
            stream.close()
            return None
        if i % 2:
            chunks = client.completions.create(model=name, prompt=prompt, max_tokens=TOKENS,
                                               temperature=0, stream=True)
            return (name, prompt), "".join(c.choices[0].text for c in chunks)
        done = client.completions.create(model=name, prompt=prompt, max_tokens=TOKENS,
                                         temperature=0)
        return (name, prompt), done.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = [a for a in pool.map(one, range(300)) if a is not None]
    assert len(answers) == 300 - len(range(3, 300, 7))
    wrong = [(combo, text) for combo, text in answers if text != expected[combo]]
    assert not wrong
    health = wait_until_idle(server)
    assert health["status"] == "ok" and health["accepted"] == 0 and health["running"] == 0


def test_a_request_a_stopping_engine_refuses_gives_its_slot_back(tiny):
    import asyncio

    from quiver.errors import QuiverError
    from quiver.serving.engine import Engine
    from quiver.serving.rows import BASE, Route, serve_library
    from quiver.serving.sampling import SamplingParams
    from quiver.serving.server import _Job, _Slots

    served = serve_library(*tiny, None)  # the bare base: nothing attached
    engine, slots = Engine(served), _Slots(2)
    engine.stop()  # as at shutdown: no request gets in any more

    async def arrive():
        _Job(engine, slots, [1, 2], Route(BASE), SamplingParams(), [], served)

    with pytest.raises(QuiverError, match="stopped"):
        asyncio.run(arrive())
    assert slots.used == 0  # else the server would answer 429 for ever after
