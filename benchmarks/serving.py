"""Serving throughput: `quiver serve` against one request at a time and PEFT's mixed batch.

A library of 32 synthetic rank-4 experts (random A and B, on all 7 linear modules of the real
SmolLM2-135M-Instruct, fp32, CPU; benchmarks/routing.py's `make_library`: untrained, so the
text means nothing, but the arithmetic is the real one). 64 requests, each naming a random
expert (`expert:eNNN`) or Arrow (`arrow`, top-4 over all 32; a quarter of them), with prompts
of 5 to 40 tokens, greedy, at most `--max-tokens` new tokens each, sent at concurrency 1, 8
and 32:

- quiver: `quiver serve` in its own process, driven over HTTP by the `openai` client from C
  threads, each sending its next request when the last one is answered (closed loop).
  Concurrency 1 is "one request at a time". Latency: from sending a request to its answer.
- PEFT: the same experts loaded into one `PeftModel` (`create_arrow_model`, which also holds
  each expert as an adapter of its own), the requests in arrival order in batches of C, each
  batch one `generate(..., adapter_names=[...])` (the expert's adapter or `arrow_router` per
  row), left-padded. Latency: the duration of the request's batch.

Tokens/s counts generated tokens (up to and without the end-of-sequence token) over the
wall time of all 64 requests. Everything runs with one torch thread (OMP_NUM_THREADS=1), each
side in its own process so that its peak RSS is its own. Untimed warm-up rounds first (quiver
measures its mixture strategies once per layer shape and batch size).

On a GPU (`--device cuda`): `quiver serve` takes the first CUDA device by itself (bf16, its
default there), PEFT's model goes to the same device in bf16, and memory is also read on
the GPU (the server's as nvidia-smi's used memory above what it was before the server
started; PEFT's from `torch.cuda.max_memory_allocated`). Without the `openai` package the
requests go over plain HTTP (`http.client`, the same JSON).

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.serving [--max-tokens 16]
       [--device cpu|cuda] [--concurrency 1 8 32] [--requests 64] [--results DIR]
Writes benchmarks/results/serving.json and .md (or DIR/serving.json and .md)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import resource
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    RESULTS,
    ROOT,
    provenance,
    provenance_line,
    python_module,
    write_json,
    write_text,
)
from benchmarks.local_server import ServerNotUp, free_port, wait_until_healthy
from benchmarks.routing import make_library

N_EXPERTS, N_REQUESTS, ARROW_SHARE = 32, 64, 0.25
CONCURRENCY = (1, 8, 32)
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Question: What is 17 plus 25? Answer:",
    "Translate to German: The weather is nice today.",
    "List three uses of a paperclip:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who",
    "Explain in one sentence why the sky is blue.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Summarize: Photosynthesis converts light energy into chemical energy stored in glucose, "
    "releasing oxygen as a by-product. It takes place in the chloroplasts of plant cells.",
    "Q: Is a tomato a fruit or a vegetable?\nA:",
    "The three primary colors are",
    "Dear hiring manager, I am writing to apply for",
]


def requests_to_send(seed: int = 0, n: int = N_REQUESTS) -> list[tuple[str, str]]:
    """64 (model, prompt) pairs: a random expert, or Arrow a quarter of the time (fewer:
    the first `n` of the same ones)."""
    rng = random.Random(seed)
    return [("arrow" if rng.random() < ARROW_SHARE else f"expert:e{rng.randrange(N_EXPERTS):03d}",
             PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


# ------------------------------------------------------------------------------ quiver
def _start_server(library: str, port: int, log, device: str = "cpu") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torch.cuda.is_available():  # `quiver serve` takes the first visible GPU by itself
        env["CUDA_VISIBLE_DEVICES"] = (str(torch.device(device).index or 0) if is_cuda(device)
                                       else "")
    process = subprocess.Popen(
        python_module("quiver.cli", "serve", "--library", library, "--port", str(port),
                      "--max-batch", "32", "--max-concurrent", "64"), env=env, stderr=log)
    try:
        wait_until_healthy(port, process, timeout=300)
    except ServerNotUp as err:
        process.kill()
        log.seek(0)
        raise RuntimeError(f"{err}: {log.read().decode()}") from None
    return process


def _memory_mib(pid: int) -> dict[str, int]:
    """Peak and current resident memory of a process (Linux /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = round(int(value.split()[0]) / 1024)
    return {"peak_rss_mib": fields["VmHWM"], "rss_mib": fields["VmRSS"]}


def _gpu_used_mib(device: str) -> int | None:
    """The GPU's used memory as nvidia-smi reports it (every process on it), or None."""
    index = torch.device(device).index or 0
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                               "nounits", f"--id={index}"], capture_output=True, text=True,
                              timeout=30)
        return int(done.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def run_quiver(library: str, requests: list[tuple[str, str]], max_tokens: int,
               concurrency=CONCURRENCY, device: str = "cpu") -> dict:
    # the server's stderr goes to a file: a pipe nobody reads could fill and block it
    with tempfile.TemporaryFile() as log:
        port = free_port()
        gpu_before = _gpu_used_mib(device) if is_cuda(device) else None
        started = time.perf_counter()
        process = _start_server(library, port, log, device)
        startup = time.perf_counter() - started
        try:
            result = _drive(port, requests, max_tokens, concurrency)
            result["memory"] = _memory_mib(process.pid)
            if is_cuda(device):
                gpu_after = _gpu_used_mib(device)
                result["memory"]["gpu_used_mib"] = (None if None in (gpu_before, gpu_after)
                                                    else gpu_after - gpu_before)
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {"startup_s": round(startup, 1), **result}


def _client(port: int):
    """A completion call to the server: the `openai` client's, or plain HTTP without it."""
    try:
        import openai
    except ImportError:  # e.g. an offline GPU machine without the package: the same JSON
        return None
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                         max_retries=0, timeout=600)


def _complete_http(port: int, name: str, prompt: str, max_tokens: int) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        body = json.dumps({"model": name, "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0})
        connection.request("POST", "/v1/completions", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data}")
    finally:
        connection.close()
    return data["usage"]["completion_tokens"], data["choices"][0]["text"]


def _drive(port: int, requests: list[tuple[str, str]], max_tokens: int,
           concurrency=CONCURRENCY) -> dict:
    """The requests at each concurrency, C client threads in a closed loop."""
    client = _client(port)

    def one(request):
        name, prompt = request
        sent = time.perf_counter()
        if client is None:
            tokens, text = _complete_http(port, name, prompt, max_tokens)
            return time.perf_counter() - sent, tokens, text
        done = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens,
                                         temperature=0)
        return (time.perf_counter() - sent, done.usage.completion_tokens, done.choices[0].text)

    def run(concurrency: int, batch: list) -> tuple[float, list]:
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(one, batch))
        return time.perf_counter() - started, answers

    for c in sorted(concurrency, reverse=True):  # warm-up: the mixture strategies are
        run(c, requests[:c * 2])                  # measured once
    rows, texts = {}, {}
    for c in concurrency:
        wall, answers = run(c, requests)
        rows[c] = _row(wall, [a[0] for a in answers], [a[1] for a in answers])
        texts[c] = [a[2] for a in answers]
    return {"client": "openai" if client is not None else "http.client",
            "rows": rows, "texts": texts[concurrency[-1]]}


def _row(wall: float, latencies: list[float], tokens: list[int]) -> dict:
    return {"wall_s": round(wall, 2), "tokens": int(sum(tokens)),
            "tokens_per_s": round(sum(tokens) / wall, 1),
            "p50_s": round(float(np.percentile(latencies, 50)), 2),
            "p95_s": round(float(np.percentile(latencies, 95)), 2)}


# -------------------------------------------------------------------------------- PEFT
def run_peft(library_dir: str, requests: list[tuple[str, str]], max_tokens: int,
             concurrency=CONCURRENCY, device: str = "cpu") -> dict:
    """PEFT's mixed-adapter batches (in this process, which does nothing else)."""
    from peft import ArrowConfig, create_arrow_model

    from quiver.library import Library
    from quiver.models import load_base

    torch.set_num_threads(1)
    library = Library(library_dir)
    names = library.names()[:N_EXPERTS]
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for name in names:
            library.export_peft(name, f"{tmp}/{name}")
            folders.append(f"{tmp}/{name}")
        base, tokenizer = load_base(library.base["name"], device=device)
        started = time.perf_counter()
        config = ArrowConfig(top_k=min(4, len(names)), rng_seed=0)
        model = create_arrow_model(base, folders, config)
        if is_cuda(device):
            torch.cuda.synchronize()
        load = time.perf_counter() - started
    adapter = {f"expert:{name}": f"task_{i}" for i, name in enumerate(names)}
    adapter["arrow"] = "arrow_router"
    tokenizer.padding_side = "left"
    eos = {tokenizer.eos_token_id, model.generation_config.eos_token_id}

    def batch_run(batch):
        encoded = tokenizer([p for _, p in batch], return_tensors="pt", padding=True).to(device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False,
                                 adapter_names=[adapter[n] for n, _ in batch],
                                 pad_token_id=tokenizer.pad_token_id)
        if is_cuda(device):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        generated = out[:, encoded.input_ids.shape[1]:].tolist()
        kept = [ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]
                for ids in generated]
        return seconds, kept

    batch_run(requests[:8])  # warm-up
    rows, texts = {}, []
    for c in concurrency:
        wall, latencies, tokens, texts = 0.0, [], [], []
        for start in range(0, len(requests), c):
            seconds, kept = batch_run(requests[start:start + c])
            wall += seconds
            latencies += [seconds] * len(kept)
            tokens += [len(ids) for ids in kept]
            texts += [tokenizer.decode(ids, skip_special_tokens=True) for ids in kept]
        rows[c] = _row(wall, latencies, tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    memory = {"peak_rss_mib": round(peak)}
    if is_cuda(device):
        memory["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return {"load_s": round(load, 1), "rows": rows, "memory": memory, "texts": texts}


# ------------------------------------------------------------------------------ output
def write(args, requests, quiver: dict, peft: dict) -> None:
    concurrency, cuda = args.concurrency, is_cuda(args.device)
    same = [q == p for q, p, (name, _) in zip(quiver["texts"], peft["texts"], requests,
                                               strict=True) if name != "arrow"]
    same_arrow = [q == p for q, p, (name, _) in zip(quiver["texts"], peft["texts"], requests,
                                                     strict=True) if name == "arrow"]
    record = {**provenance(args.device, threads=1),  # each side with one torch thread
              "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
              "experts": N_EXPERTS, "requests": len(requests),
              "arrow_requests": sum(n == "arrow" for n, _ in requests),
              "max_tokens": args.max_tokens, "experts_kind": "synthetic (random A and B)",
              "quiver": {k: v for k, v in quiver.items() if k not in ("texts", "client")},
              "peft": {k: v for k, v in peft.items() if k != "texts"},
              "same_text_as_peft": {"expert": [sum(same), len(same)],
                                    "arrow": [sum(same_arrow), len(same_arrow)]}}
    if cuda:  # the CPU record as it always was
        record.update(device=args.device, concurrency=list(concurrency),
                      client=quiver.get("client"))
    write_json(args.results / "serving.json", record, indent=2)
    one = quiver["rows"][1]["tokens_per_s"] if 1 in quiver["rows"] else None
    client = ("the `openai` client" if quiver.get("client", "openai") == "openai"
              else "`http.client` (the same JSON; no `openai` package here)")
    lines = [
        "# Serving: batched mixed-expert generation (" + ("GPU" if cuda else "CPU") + ")", "",
        provenance_line(record), "",
        f"SmolLM2-135M-Instruct {'bf16' if cuda else 'fp32'}, a library of {N_EXPERTS} "
        "synthetic rank-4 LoRA experts (random A and B, untrained) on all 7 linear modules. "
        f"{len(requests)} requests, {record['arrow_requests']} of them `arrow` (top-4 over all "
        f"{N_EXPERTS}), the others a random `expert:NAME`; greedy, at most {args.max_tokens} "
        f"new tokens. quiver: `quiver serve` over HTTP with {client}, C clients in a "
        "closed loop (C = 1 is one request at a time). PEFT: one `PeftModel` holding the same "
        "experts (`create_arrow_model`), batches of C requests in arrival order, each one "
        "`generate(..., adapter_names=[...])`.", "",
        "| concurrency | quiver tokens/s | p50 (s) | p95 (s) | x one at a time | PEFT tokens/s "
        "| p50 (s) | p95 (s) | quiver / PEFT |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in concurrency:
        q, p = quiver["rows"][c], peft["rows"][c]
        alone = f"{q['tokens_per_s'] / one:.2f}x" if one else "n/a"
        lines.append(f"| {c} | {q['tokens_per_s']} | {q['p50_s']} | {q['p95_s']} | "
                     f"{alone} | {p['tokens_per_s']} | {p['p50_s']} | "
                     f"{p['p95_s']} | {q['tokens_per_s'] / p['tokens_per_s']:.2f}x |")
    gpu = ""
    if cuda:
        used = quiver["memory"].get("gpu_used_mib")
        gpu = (f" On the GPU: the server {'unknown' if used is None else f'{used} MiB'} "
               "(nvidia-smi's used memory above its level before the server started: "
               "CUDA context and torch's cache included), the PEFT process's peak "
               f"{peft['memory'].get('peak_cuda_mib')} MiB allocated by torch.")
    lines += [
        "",
        f"Memory: the quiver server's peak RSS {quiver['memory']['peak_rss_mib']} MiB "
        f"({quiver['memory']['rss_mib']} MiB at the end; model, {N_EXPERTS} experts, KV caches, "
        f"FastAPI); the PEFT process's peak RSS {peft['memory']['peak_rss_mib']} MiB. Server "
        f"start-up {quiver['startup_s']} s (model load, experts attached, Arrow prototypes "
        f"stored in the library on first use); PEFT load {peft['load_s']} s.{gpu}", "",
        f"Same text as PEFT at concurrency {concurrency[-1]}: {sum(same)} of {len(same)} "
        f"single-expert requests; {sum(same_arrow)} of {len(same_arrow)} Arrow requests "
        "(PEFT's Arrow computes its prototypes by power iteration from a random start, quiver's "
        "exactly, so their routing can differ).",
    ]
    write_text(args.results / "serving.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--library", default=str(Path(tempfile.gettempdir()) / "quiver-serving"))
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda: the server and PEFT's model on the GPU (bf16)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY),
                        help="client concurrencies to measure, in this order (default 1 8 32)")
    parser.add_argument("--requests", type=int, default=N_REQUESTS,
                        help="requests sent at each concurrency (default 64)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for serving.json and .md (default benchmarks/results)")
    parser.add_argument("--peft-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.library = str(Path(args.library).absolute())  # the PEFT worker runs at the root
    requests = requests_to_send(n=args.requests)
    library = f"{args.library}/library"
    if args.peft_worker:
        print("RESULT " + json.dumps(run_peft(library, requests, args.max_tokens,
                                              args.concurrency, args.device)), flush=True)
        return
    torch.set_num_threads(1)
    make_library(Path(args.library), N_EXPERTS)
    quiver = run_quiver(library, requests, args.max_tokens, args.concurrency, args.device)
    print(json.dumps({k: v for k, v in quiver.items() if k != "texts"}), flush=True)
    done = subprocess.run(python_module("benchmarks.serving", "--peft-worker", "--library",
                                        args.library, "--max-tokens", str(args.max_tokens),
                                        "--device", args.device, "--requests",
                                        str(args.requests), "--concurrency",
                                        *map(str, args.concurrency)),
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"PEFT worker failed: {done.stderr.strip()[-2000:]}")
    peft = json.loads(line[7:])
    peft["rows"] = {int(c): row for c, row in peft["rows"].items()}  # JSON keys are strings
    write(args, requests, quiver, peft)


if __name__ == "__main__":
    main()
