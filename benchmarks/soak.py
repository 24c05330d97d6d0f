"""Soak test of `quiver serve`: many clients for minutes, valid, bad and poisoned requests mixed.

A server (its own process, 127.0.0.1 only) serves a library; `--clients` closed-loop clients,
each with one keep-alive HTTP connection (aiohttp), send request after request until
`--minutes` have passed or `--max-requests` were sent. Each request is, at random (seeded):

- **valid** (the rest): a completion or chat completion naming `base`, `arrow`, `uniform` or
  one of the healthy experts, greedy or seeded sampling, 30% of them streamed; one stream in
  ten is dropped by its client after its first chunk. A valid request is *lost* unless it is
  answered 200 with a whole completion (a stream: ending in `[DONE]`); and the answers to
  the same request must all be the same text, however the batch around them was made
  (*mismatched* otherwise);
- **bad** (20%): one of the kinds in `BAD` (unknown model, out-of-range numbers, a body that is
  not a JSON object of the right shape, wrong content type, too big, wrong key, a client
  that disconnects in the middle of its body); each must be answered 4xx in OpenAI's error
  shape `{"error": {message, type, param, code}}` (the disconnect: the server serves on);
- **poisoned** (4%): names an expert whose rows the server was told to break in the forward
  pass once decoding has begun (`--poison`: NaN routing weights for one expert, an exception
  in the routing for another). It must fail alone: a 500 in OpenAI's shape, or in a stream
  an error event then `[DONE]`; the valid requests batched beside it are unaffected (they
  are neither lost nor mismatched).

Reported: requests of each kind, lost, mismatched, 5xx outside the poisoned, bad input
answered otherwise than 4xx in OpenAI's shape, p50/p95 latency of the valid requests per
window, the server's RSS over time (trend after the first window, MB/min), how long a SIGINT
took to stop it, and the server's log (lines, tracebacks).

Usage: .venv/bin/python -m benchmarks.soak [--library URL] [--minutes 10] [--clients 24]
       [--max-requests 100000] [--window 120] [--results DIR]
Without `--library`, a library of 8 random rank-4 experts of SmolLM2-135M-Instruct is made.
Writes benchmarks/results/soak.json and .md (or DIR/soak.json and .md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from benchmarks.common import (
    RESULTS,
    ROOT,
    provenance,
    provenance_line,
    python_module,
    write_json,
    write_text,
)
from benchmarks.local_server import ServerNotUp, free_port, health, wait_until_healthy

KEY = "soak-key"
PROMPTS = ["The capital of France is", "Count: one, two, three,", "Spell 'river' backwards:",
           "2 + 3 =", "A short poem about rain:", "Q: What is 7 times 6?\nA:",
           "List three colours:", "Once upon a time"]
BAD_SHARE, POISON_SHARE, STREAM_SHARE, DROP_SHARE = 0.20, 0.04, 0.30, 0.10
MAX_BODY_BYTES = 65_536


# ------------------------------------------------------------------------- the server
def serve_poisoned(library: str, port: int, poison: dict[str, str], max_batch: int) -> None:
    """Run `quiver serve` over `library`, with the rows of the experts in `poison`
    ({name: "nan" or "raise"}) broken in every decoding pass (the child process)."""
    from quiver.serving.config import ServeConfig
    from quiver.serving.generate import load_served
    from quiver.serving.server import serve

    served = load_served(library)
    broken = {served.route(f"expert:{name}"): how for name, how in poison.items()}
    context = served.context
    set_rows, route = context.set_rows, context.route
    current = {"routes": [], "per_row": 1}

    def watch_rows(routes, tokens_per_row):
        current["routes"], current["per_row"] = list(routes), tokens_per_row
        set_rows(routes, tokens_per_row)

    def poisoned_route(layer, x, projections=None):
        weights, indices = route(layer, x, projections)
        if current["per_row"] != 1:  # prefill: let the request start, break it mid-way
            return weights, indices
        hit = [(r, broken[rt]) for r, rt in enumerate(current["routes"]) if rt in broken]
        if any(how == "raise" for _, how in hit):
            raise RuntimeError("routing failed (poisoned on purpose by benchmarks/soak.py)")
        if hit:
            weights = weights.clone()
            weights[[r for r, _ in hit]] = float("nan")
        return weights, indices

    context.set_rows, context.route = watch_rows, poisoned_route
    serve(served, ServeConfig(port=port, max_batch=max_batch, max_tokens=64,
                              max_prompt_tokens=256, max_body_bytes=MAX_BODY_BYTES), KEY)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------- the requests
@dataclass
class Outcome:
    kind: str  # valid, dropped, bad:NAME, poisoned
    start: float  # seconds since the soak began
    latency: float
    status: int  # HTTP status (0: no answer)
    ok: bool  # what this kind must get, it got
    note: str = ""


def _openai_error(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


def _raw(body: bytes, content_type: str = "application/json") -> dict:
    return {"data": body, "headers": {"content-type": content_type}}


def _chat(model: str, prompt: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD: dict[str, tuple[int, str, dict]] = {  # name: (expected status, path, what to send)
    "unknown model": (404, CHAT, {"json": _chat("expert:nope", "hi")}),
    "seed over 64 bits": (400, CHAT, {"json": _chat("base", "hi", seed=2**64, temperature=0.7)}),
    "temperature 5": (400, CHAT, {"json": _chat("base", "hi", temperature=5)}),
    "top_p 0": (400, CHAT, {"json": _chat("base", "hi", top_p=0)}),
    "n 0": (400, CHAT, {"json": _chat("base", "hi", n=0)}),
    "max_tokens 0": (400, CHAT, {"json": _chat("base", "hi", max_tokens=0)}),
    "max_tokens 5000 digits": (400, COMPLETIONS, _raw(b'{"model": "base", "prompt": "hi", '
                                                      b'"max_tokens": ' + b"9" * 5000 + b"}")),
    "nested 60000 deep": (400, CHAT, _raw(b"[" * 60_000)),
    "not JSON": (400, COMPLETIONS, _raw(b'{"model": "base", "prompt": ')),
    "NaN": (400, COMPLETIONS, _raw(b'{"model": "base", "prompt": "hi", "temperature": NaN}')),
    "text/plain": (400, CHAT, _raw(json.dumps(_chat("base", "hi")).encode(), "text/plain")),
    "body too big": (413, CHAT, {"json": _chat("base", "x" * (MAX_BODY_BYTES + 10))}),
    "wrong key": (401, CHAT, {"json": _chat("base", "hi"),
                              "headers": {"authorization": "Bearer no"}}),
    "no messages": (400, CHAT, {"json": {"model": "base", "messages": []}}),
    "five stop strings": (400, CHAT, {"json": _chat("base", "hi", stop=list("abcde"))}),
    "logit_bias": (400, CHAT, {"json": _chat("base", "hi", logit_bias={"1": 5})}),
    "prompt too long": (400, COMPLETIONS, {"json": {"model": "base", "prompt": "word " * 400}}),
    "disconnect mid-body": (0, COMPLETIONS, {}),
}


class Client:
    """One closed-loop client: one keep-alive connection, one request at a time."""

    def __init__(self, port: int, seed: int, names: list[str], poisoned: list[str],
                 began: float, answers: dict) -> None:
        self.port, self.rng, self.names, self.poisoned = port, random.Random(seed), names, poisoned
        self.began, self.answers = began, answers
        self.url = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession(
            headers={"authorization": f"Bearer {KEY}"},
            connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=300))

    async def one(self) -> Outcome:
        roll = self.rng.random()
        start = time.monotonic()
        if roll < BAD_SHARE:
            name = self.rng.choice(list(BAD))
            status, ok, note = await self._bad(name)
            kind = f"bad:{name}"
        elif roll < BAD_SHARE + POISON_SHARE:
            kind = "poisoned"
            status, ok, note = await self._poisoned()
        else:
            kind, status, ok, note = await self._valid()
        return Outcome(kind, start - self.began, time.monotonic() - start, status, ok, note)

    async def _valid(self) -> tuple[str, int, bool, str]:
        model = self.rng.choice(self.names)
        prompt = self.rng.choice(PROMPTS)
        sampled = self.rng.random() < 0.25
        body = {"model": model, "max_tokens": self.rng.choice([8, 16, 32]),
                "temperature": 0.8 if sampled else 0.0}
        if sampled:
            body["seed"] = PROMPTS.index(prompt)
        chat = self.rng.random() < 0.5
        body.update(_chat(model, prompt) if chat else {"prompt": prompt})
        path = "/v1/chat/completions" if chat else "/v1/completions"
        stream = self.rng.random() < STREAM_SHARE
        key = json.dumps({**body, "path": path}, sort_keys=True)
        try:
            sent = {**body, "stream": True} if stream else body
            async with self.http.post(self.url + path, json=sent) as response:
                if response.status != 200:
                    return "valid", response.status, False, (await response.text())[:200]
                if not stream:
                    choice = (await response.json())["choices"][0]
                    text = choice["message"]["content"] if chat else choice["text"]
                    return "valid", 200, *self._same(key, text)
                text, done, drop = "", False, self.rng.random() < DROP_SHARE
                async for raw in response.content:
                    if drop:  # the client goes away after the first chunk
                        return "dropped", 200, True, ""
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return "valid", 200, False, f"error event: {chunk['error']['message']}"
                    for choice in chunk["choices"]:
                        text += (choice["delta"].get("content") or "") if chat else choice["text"]
                if not done:
                    return "valid", 200, False, "the stream ended without [DONE]"
                return "valid", 200, *self._same(key, text)
        except (TimeoutError, aiohttp.ClientError) as err:
            return "valid", 0, False, f"{err.__class__.__name__}: {err}"

    def _same(self, key: str, text: str) -> tuple[bool, str]:
        """(True, "") when `text` is what the first answer to the same request said."""
        first = self.answers.setdefault(key, text)
        return (True, "") if first == text else (False, f"mismatch: {first!r} then {text!r}")

    async def _bad(self, name: str) -> tuple[int, bool, str]:
        expected, path, send = BAD[name]
        if name == "disconnect mid-body":
            await self._disconnect_mid_body()
            return 0, True, ""
        try:
            async with self.http.post(self.url + path, **send) as response:
                status, body = response.status, await response.read()
        except (TimeoutError, aiohttp.ClientError) as err:
            return 0, False, f"{err.__class__.__name__}: {err}"
        ok = status == expected and _openai_error(body)
        return status, ok, "" if ok else body[:200].decode(errors="replace")

    async def _disconnect_mid_body(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"model": "base", "prompt": "')
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async def _poisoned(self) -> tuple[int, bool, str]:
        body = _chat(f"expert:{self.rng.choice(self.poisoned)}", self.rng.choice(PROMPTS),
                     max_tokens=16, temperature=0)
        stream = self.rng.random() < 0.5
        try:
            async with self.http.post(self.url + "/v1/chat/completions",
                                      json={**body, "stream": stream}) as response:
                status, raw = response.status, await response.read()
        except (TimeoutError, aiohttp.ClientError) as err:
            return 0, False, f"{err.__class__.__name__}: {err}"
        if not stream:
            return status, status == 500 and _openai_error(raw), raw[:200].decode()
        lines = [line for line in raw.decode().splitlines() if line]
        error = next((line for line in lines if '"error"' in line), None)
        ok = (status == 200 and error is not None and _openai_error(error[6:].encode())
              and lines[-1] == "data: [DONE]")
        return status, ok, (error or (lines[-1] if lines else ""))[:200]


# ------------------------------------------------------------------------- the soak
async def _drive(port: int, names: list[str], poisoned: list[str], clients: int,
                 seconds: float, max_requests: int, pid: int, rss: list) -> list[Outcome]:
    began = time.monotonic()
    outcomes: list[Outcome] = []
    answers: dict[str, str] = {}
    sent = 0

    async def loop(i: int) -> None:
        nonlocal sent
        client = Client(port, i, names, poisoned, began, answers)
        async with client.http:  # closes the session at the end
            while time.monotonic() - began < seconds and sent < max_requests:
                sent += 1
                outcomes.append(await client.one())

    async def sample_rss() -> None:
        while True:
            rss.append((time.monotonic() - began, _rss_mb(pid)))
            await asyncio.sleep(5)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(loop(i) for i in range(clients)))
    sampler.cancel()
    return outcomes


def soak(library: str, minutes: float, clients: int, max_requests: int, window: float,
         log_path: Path, max_batch: int = 32, threads: int | None = None) -> dict:
    """Run the soak against a fresh server over `library`; the summary as a dict."""
    from quiver.library import Library

    experts = sorted(Library(library).names())
    if len(experts) < 3:
        raise SystemExit("the soak needs a library of at least 3 experts")
    poison = {experts[-1]: "raise", experts[-2]: "nan"}
    names = ["base", "arrow", "uniform"] + [f"expert:{e}" for e in experts[:-2][:6]]
    if "://" not in library:  # a local folder: the server runs at the repository root
        library = str(Path(library).absolute())
    port = free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = python_module("benchmarks.soak", "--serve-poisoned", json.dumps(poison),
                            "--library", library, "--port", str(port),
                            "--max-batch", str(max_batch))
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=ROOT)
    try:
        try:
            wait_until_healthy(port, server, timeout=300)
        except ServerNotUp as err:
            raise SystemExit(f"{err}; see its log") from None
        rss: list[tuple[float, float]] = []
        outcomes = asyncio.run(_drive(port, names, list(poison), clients, minutes * 60,
                                      max_requests, server.pid, rss))
        left = health(port, timeout=10)
        stopped = time.monotonic()
        server.send_signal(signal.SIGINT)
        exit_code = server.wait(timeout=60)
        shutdown = time.monotonic() - stopped
    finally:
        if server.poll() is None:
            server.kill()
    return summarize(outcomes, rss, window, left, shutdown, exit_code, log_path.read_text(),
                     poison, names, clients)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summarize(outcomes: list[Outcome], rss: list, window: float, health: dict,
              shutdown: float, exit_code: int, log: str, poison: dict, names: list[str],
              clients: int) -> dict:
    valid = [o for o in outcomes if o.kind == "valid"]
    bad = [o for o in outcomes if o.kind.startswith("bad:")]
    poisoned = [o for o in outcomes if o.kind == "poisoned"]
    end = max((o.start + o.latency for o in outcomes), default=0.0)
    windows = []
    for w in range(max(1, int(end // window) + (end % window > 0))):
        lat = [o.latency for o in valid if w * window <= o.start < (w + 1) * window and o.ok]
        mb = [m for t, m in rss if w * window <= t < (w + 1) * window]
        windows.append({"window": w, "from_s": w * window, "valid": len(lat),
                        "p50_s": round(_percentile(lat, 0.5), 2),
                        "p95_s": round(_percentile(lat, 0.95), 2),
                        "rss_mb_max": round(max(mb), 1) if mb else None})
    late = [(t, mb) for t, mb in rss if t >= min(window, end / 2)]
    trend = _slope(late) * 60 if len(late) > 2 else float("nan")
    lost = [o for o in valid if not o.ok and not o.note.startswith("mismatch")]
    mismatched = [o for o in valid if o.note.startswith("mismatch")]
    bad_wrong = [o for o in bad if not o.ok]
    kinds = sorted({o.kind for o in bad})
    return {
        "requests": len(outcomes), "clients": clients, "seconds": round(end, 1),
        "valid": len(valid), "dropped_streams": sum(o.kind == "dropped" for o in outcomes),
        "lost_valid": len(lost), "mismatched": len(mismatched),
        "bad": len(bad), "bad_kinds": len(kinds), "bad_not_4xx_openai": len(bad_wrong),
        "poisoned": len(poisoned), "poisoned_failed_alone": sum(o.ok for o in poisoned),
        "5xx_outside_poisoned": sum(o.status >= 500 for o in valid + bad),
        "windows": windows,
        "rss_mb_first": round(rss[0][1], 1) if rss else None,
        "rss_mb_last": round(rss[-1][1], 1) if rss else None,
        "rss_trend_mb_per_min": round(trend, 2),
        "rss_mb_every_5s": [[round(t), round(m, 1)] for t, m in rss],
        "left_running": health, "shutdown_s": round(shutdown, 2), "exit_code": exit_code,
        "log_lines": len(log.splitlines()), "log_tracebacks": log.count("Traceback"),
        "log_errors": sum("quiver serve ERROR" in line for line in log.splitlines()),
        "poison": poison, "names": names,
        "examples": {"lost": [asdict(o) for o in lost[:5]],
                     "mismatched": [asdict(o) for o in mismatched[:5]],
                     "bad": [asdict(o) for o in bad_wrong[:5]],
                     "poisoned": [asdict(o) for o in poisoned if not o.ok][:5]},
        "bad_by_kind": {k: sum(o.kind == k for o in bad) for k in kinds},
    }


def _slope(points: list[tuple[float, float]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def write(summary: dict, args, results: Path) -> None:
    # the server's own thread count is OMP_NUM_THREADS, which the command line records
    record = {**provenance(device="cpu"), "library": args.library or "8 random experts",
              **summary}
    write_json(results / "soak.json", record, indent=2)
    s = summary
    lines = [
        "# Soak of `quiver serve`", "",
        provenance_line(record), "",
        f"Library: {record['library']}; {s['clients']} closed-loop "
        f"clients on 127.0.0.1 for {s['seconds']:.0f} s; the server's rows of "
        f"{', '.join(f'`expert:{k}` ({v})' for k, v in s['poison'].items())} broken on "
        "purpose in every decoding pass.", "",
        "| requests | valid | lost | mismatched | streams dropped | bad (kinds) | bad not 4xx "
        "in OpenAI's shape | poisoned | failed alone | 5xx outside the poisoned |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['requests']} | {s['valid']} | {s['lost_valid']} | {s['mismatched']} | "
        f"{s['dropped_streams']} | {s['bad']} ({s['bad_kinds']}) | {s['bad_not_4xx_openai']} | "
        f"{s['poisoned']} | {s['poisoned_failed_alone']} | {s['5xx_outside_poisoned']} |", "",
        "| window | from (s) | valid answered | p50 (s) | p95 (s) | server RSS, max (MB) |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {w['window']} | {w['from_s']:.0f} | {w['valid']} | {w['p50_s']} | {w['p95_s']} | "
          f"{w.get('rss_mb_max')} |" for w in s["windows"]], "",
        f"Server RSS {s['rss_mb_first']} MB at the start, {s['rss_mb_last']} MB at the end, "
        f"trend after the first window {s['rss_trend_mb_per_min']} MB/min. Left running at the "
        f"end: {s['left_running']}. SIGINT stopped it in {s['shutdown_s']} s (exit "
        f"{s['exit_code']}). Its log: {s['log_lines']} lines, {s['log_tracebacks']} tracebacks, "
        f"{s['log_errors']} one-line errors (5xx and failed rows).", "",
        "Bad inputs sent: " + ", ".join(f"{k[4:]} {n}" for k, n in s["bad_by_kind"].items())
        + ".",
    ]
    write_text(results / "soak.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--library", help="library URL (default: 8 random experts)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--window", type=float, default=120.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--serve-poisoned", metavar="JSON", help=argparse.SUPPRESS)  # the child
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_poisoned:
        return serve_poisoned(args.library, args.port, json.loads(args.serve_poisoned),
                              args.max_batch)
    with tempfile.TemporaryDirectory() as tmp:
        library = args.library
        if library is None:
            from benchmarks.routing import make_library

            library = make_library(Path(tmp), 8).url
        summary = soak(library, args.minutes, args.clients, args.max_requests, args.window,
                       Path(tmp) / "server.log")
    write(summary, args, args.results)
    print((args.results / "soak.md").read_text())


if __name__ == "__main__":
    main()
