"""Routing speed and memory: quiver's Arrow against the bare base model and PEFT's Arrow.

The real SmolLM2-135M-Instruct (fp32, CPU), E synthetic rank-4 experts on all 7 linear
modules, top-4. For each E, in its own process (so peak memory is its own):
  - load: reading the E experts from a local library, computing their prototypes (first
    time) and attaching them;
  - prefill: one forward over 4 x 128 tokens, as a ratio to the bare model in the same process;
  - decode: greedy generation of 32 tokens for 4 prompts (KV cache), same ratio;
  - peak RSS, against base-model RSS + the experts' fp32 weights;
  - PEFT's `create_arrow_model` with the same experts (PEFT folders), where it is not too slow.

On a GPU (`--device cuda`) the model is bf16 (quiver's default there), every timing is
bracketed by `torch.cuda.synchronize()` and peak memory is also read from
`torch.cuda.max_memory_allocated`.

Usage: .venv/bin/python -m benchmarks.routing [--experts 8 32 128 256] [--peft-max 32]
       [--device cpu|cuda] [--results DIR]
Writes benchmarks/results/routing.json and .md (or DIR/routing.json and .md)
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

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

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_library(root: Path, n_experts: int):
    """A library of `n_experts` random rank-4 experts (and their PEFT folders)."""
    from quiver.library import Expert, ExpertInfo, Library
    from quiver.models import fingerprint, linear_module_shapes, load_base

    model, _ = load_base("smollm2-135m", device="cpu")
    library = Library(str(root / "library"), create=True)
    library.ensure_base("smollm2-135m", fingerprint(model), linear_module_shapes(model))
    shapes = linear_module_shapes(model)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.0,
              "target_modules": list(MODULES), "bias": "none", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": "smollm2-135m"}
    generator = torch.Generator().manual_seed(0)
    for e in range(len(library.names()), n_experts):
        weights = {}
        for name, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.{name}"
            a = torch.randn(4, fan_in, generator=generator) / fan_in**0.5
            weights[f"{key}.lora_A.weight"] = a
            weights[f"{key}.lora_B.weight"] = torch.randn(fan_out, 4, generator=generator) / 100
        info = ExpertInfo(f"e{e:03d}", [f"synthetic:{e}"], "smollm2-135m", None,
                          {"r": 4, "lora_alpha": 16}, source="synthetic")
        library.add(Expert(info, config, weights=weights))
    return library


def _sync(device: str) -> None:
    """Wait for the GPU's queued work (a timing on CUDA must not stop at the launch)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int, device: str = "cpu") -> float:
    fn()  # warm-up (and the mixture strategy's one-time measurement)
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return min(times)


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype))


def _swap(model, routed: dict, with_experts: bool) -> None:
    """Put the routed layers (or their plain base layers) into the model."""
    for name, layer in routed.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer if with_experts else layer.base)


def run_one(n_experts: int, library_dir: str, peft: bool, repeats: int, rounds: int,
            device: str = "cpu") -> dict:
    from quiver.library import Library
    from quiver.models import load_base
    from quiver.zero_shot import reuse

    cuda = torch.device(device).type == "cuda"
    model, tokenizer = load_base("smollm2-135m", device=device)
    library = Library(library_dir)
    names = library.names()[:n_experts]
    prompt_ids = torch.randint(100, 20_000, (4, 128),
                               generator=torch.Generator().manual_seed(1)).to(device)
    decode_ids = prompt_ids[:, :16]
    timed = functools.partial(_timed, device=device)

    def prefill(m):
        return lambda: m(input_ids=prompt_ids)

    def decode(m):
        return lambda: m.generate(input_ids=decode_ids, max_new_tokens=32, min_new_tokens=32,
                                  do_sample=False, pad_token_id=tokenizer.eos_token_id)

    row = {"experts": n_experts}
    with torch.no_grad():
        timed(prefill(model), 1), timed(decode(model), 1)
        rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # base's own peak
        cuda_base = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else 0.0
        started = time.perf_counter()
        reuse(model, library, method="arrow", experts=names, top_k=4)
        _sync(device)
        row["load_s"] = round(time.perf_counter() - started, 2)
        # Base and routed runs alternate, so a busy spell of the machine hits both alike.
        routed = {m.name: m for m in model.quiver_routing.layers}
        times = {"base_prefill": [], "prefill": [], "base_decode": [], "decode": []}
        for _ in range(rounds):
            for with_experts in (False, True):
                _swap(model, routed, with_experts)
                tag = "" if with_experts else "base_"
                times[tag + "prefill"].append(timed(prefill(model), repeats))
                times[tag + "decode"].append(timed(decode(model), max(1, repeats - 1)))
        base_prefill, base_decode = min(times["base_prefill"]), min(times["base_decode"])
        row["prefill_ratio"] = round(min(times["prefill"]) / base_prefill, 3)
        row["decode_ratio"] = round(min(times["decode"]) / base_decode, 3)
        row["base_prefill_s"] = round(base_prefill, 3)
        row["base_decode_s"] = round(base_decode, 3)
        strategies = sorted({v for k, v in model.quiver_routing.layers[0].mixture.choices.items()})
        row["strategies"] = strategies
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        experts_mib = n_experts * sum(
            t.numel() for t in library.get(names[0]).weights.values()) * 4 / 2**20
        row["peak_rss_mib"] = round(peak)
        row["base_rss_mib"] = round(rss_base)
        row["experts_mib"] = round(experts_mib)
        row["memory_over_budget"] = round(peak / (rss_base + experts_mib), 3)
        if cuda:  # the GPU's own peak: the tensors torch allocated there
            row["dtype"] = dtype_label(next(model.parameters()).dtype)
            row["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
            row["base_cuda_mib"] = round(cuda_base)
        if peft:
            row.update(_peft(n_experts, library, names, prefill, decode, base_prefill,
                             base_decode, repeats, device))
    return row


def _peft(n_experts, library, names, prefill, decode, base_prefill, base_decode, repeats,
          device="cpu"):
    from peft import ArrowConfig, create_arrow_model

    from quiver.models import load_base

    repeats = repeats if n_experts <= 32 else 1  # PEFT takes about a minute per call there
    folders = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            library.export_peft(name, f"{tmp}/{name}")
            folders.append(f"{tmp}/{name}")
        base, _ = load_base("smollm2-135m", device=device)
        started = time.perf_counter()
        peft_model = create_arrow_model(base, folders, ArrowConfig(top_k=4, rng_seed=0))
        _sync(device)
        load = time.perf_counter() - started
    return {
        "peft_load_s": round(load, 2),
        "peft_prefill_ratio": round(_timed(prefill(peft_model), repeats, device) / base_prefill,
                                    3),
        "peft_decode_ratio": round(_timed(decode(peft_model), 1, device) / base_decode, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="*", default=[8, 32, 128, 256])
    parser.add_argument("--peft-max", type=int, default=32,
                        help="run PEFT only up to this many experts (it is slow to load and run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations of base and routed measurements")
    parser.add_argument("--library", default=str(Path(tempfile.gettempdir()) / "quiver-bench"))
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda (cuda:N) for the GPU: bf16, synchronised timings")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for routing.json and .md (default benchmarks/results)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.library = str(Path(args.library).absolute())  # the workers run at the repository root
    if args.one:
        row = run_one(args.one, f"{args.library}/library", args.one <= args.peft_max,
                      args.repeats, args.rounds, args.device)
        print("RESULT " + json.dumps(row), flush=True)
        return
    make_library(Path(args.library), max(args.experts))
    rows = []
    for n in args.experts:
        command = python_module("benchmarks.routing", "--one", str(n), "--library",
                                args.library, "--peft-max", str(args.peft_max), "--repeats",
                                str(args.repeats), "--rounds", str(args.rounds), "--device",
                                args.device)
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        rows.append(json.loads(line[7:]) if line else
                    {"experts": n, "error": done.stderr.strip().splitlines()[-1:]})
        print(rows[-1], flush=True)
    _write(rows, args)


def _write(rows, args) -> None:
    cuda = torch.device(args.device).type == "cuda"
    results = args.results
    record = provenance(args.device)
    device = {"device": args.device} if cuda else {}  # the CPU record as it always was
    write_json(results / "routing.json", {**record, **device, "rows": rows}, indent=2)
    dtype = next((r["dtype"] for r in rows if "dtype" in r), "bf16") if cuda else "fp32"
    gpu_columns = " peak CUDA (MiB) | base CUDA peak (MiB) |" if cuda else ""
    lines = [
        "# Routing speed and memory (" + ("GPU" if cuda else "CPU") + ")", "",
        provenance_line(record),
        f"SmolLM2-135M-Instruct {dtype}, E synthetic rank-4 experts on all 7 linear modules, "
        "Arrow top-4. Ratios are to the bare model in the same process; prefill 4 x 128 "
        "tokens, decode 32 new tokens for 4 prompts." + (
            " Timings on the GPU, each between two `torch.cuda.synchronize()`; peak CUDA "
            "memory is `torch.cuda.max_memory_allocated`, the base's before the experts "
            "are attached (RSS is the host process's)." if cuda else ""), "",
        "| E | load (s) | prefill | decode | peak RSS (MiB) | base peak + experts (MiB) |"
        + gpu_columns +
        " PEFT load (s) | PEFT prefill | PEFT decode | quiver speed-up over PEFT (prefill) |",
        "|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else "")
        + "---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['experts']} | failed: {r['error']} |||||||||"
                         + ("||" if cuda else ""))
            continue
        peft = [f"{r['peft_load_s']}", f"{r['peft_prefill_ratio']}x", f"{r['peft_decode_ratio']}x",
                f"{r['peft_prefill_ratio'] / r['prefill_ratio']:.1f}x"] if "peft_load_s" in r \
            else [f"skipped (--peft-max {args.peft_max})" if cuda else "skipped (too slow)", "",
                  "", ""]
        gpu = f" {r['peak_cuda_mib']} | {r['base_cuda_mib']} |" if cuda else ""
        lines.append(f"| {r['experts']} | {r['load_s']} | {r['prefill_ratio']}x | "
                     f"{r['decode_ratio']}x | {r['peak_rss_mib']} | "
                     f"{r['base_rss_mib'] + r['experts_mib']} |" + gpu + " "
                     + " | ".join(peft) + " |")
    write_text(results / "routing.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
