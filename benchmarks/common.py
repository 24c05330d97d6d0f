"""What every benchmark records with its results, and how it writes them.

- Provenance: the command that made a results file, the commit and the machine (and the
  date and torch version). Every JSON record carries them as the top-level keys `command`,
  `commit`, `machine`; every Markdown table says them in its first lines
  (`provenance_line`). tests/test_benchmarks.py checks every committed result for them.
- Atomic writes: a run stopped midway never leaves half a results file or cache entry.
- Typed budgets: a budget is a frozen dataclass and `--set KEY=VALUE` is parsed by the
  field's type (`budget_setting`), so `calibrate=False` is False, never the string "False"
  (which `bool("False")` would make True).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent  # the repository root
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- provenance
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the architecture where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine_name(device: str | None = None, threads: int | None = None) -> str:
    """The CPU, its cores and the torch threads (this process's unless `threads`); the GPU
    first where `device` is CUDA (None: CUDA when there is one)."""
    import torch

    threads = torch.get_num_threads() if threads is None else threads
    name = f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch thread" + \
        ("s" if threads != 1 else "")
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
        name = f"{torch.cuda.get_device_name(torch.device(device or 'cuda'))} (CUDA), {name}"
    return name


def git_commit() -> str:
    """The checkout's short commit (`git rev-parse --short HEAD`, which benchmarks/gpu.sh
    stands in for where the tree travels without its .git)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def command_line() -> str:
    """How this process was started, as typed at the repository root: `python -m
    benchmarks.NAME ARGS`, with OMP_NUM_THREADS first where it was set."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None and spec.name else \
        f"python {sys.argv[0]}"
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + " ".join([program, *map(shlex.quote, sys.argv[1:])])


def provenance(device: str | None = None, threads: int | None = None) -> dict[str, str]:
    """`command`, `commit`, `machine`, `date` and `torch`: the first keys of every record."""
    import torch

    return {"command": command_line(), "commit": git_commit(),
            "machine": machine_name(device, threads), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__}


def provenance_line(record: dict) -> str:
    """The Markdown sentence that names a record's command, commit and machine (the form
    tests/test_benchmarks.py reads)."""
    extra = "".join(f", {label} {record[key]}" for key, label in
                    (("torch", "torch"), ("date", "on")) if record.get(key))
    return (f"`{record['command']}` at commit `{record['commit']}`, {record['machine']}"
            f"{extra}.")


# --------------------------------------------------------------------------------- writes
def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a run stopped midway never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    staging.replace(path)


def write_json(path: Path, record: Any, indent: int | None = None) -> None:
    """`record` as JSON at `path`, atomically."""
    write_text(path, json.dumps(record, indent=indent) + ("\n" if indent is not None else ""))


def recorded_time(record_path: Path) -> float:
    """The total of a `record_time` record (0 when there is none yet)."""
    return json.loads(record_path.read_text())["total_seconds"] if record_path.exists() else 0.0


def record_time(record_path: Path, seconds: float, detail: dict) -> float:
    """Add one invocation's wall time to a JSON record and return the total over all of them.

    Library builds resume across runs (and `--build-only` splits the build from the
    evaluation), and cached evaluations are not redone, so the time a folder took is the sum
    over every invocation that worked on it, not the last one's."""
    record = json.loads(record_path.read_text()) if record_path.exists() else {"runs": []}
    record["runs"].append({"seconds": round(seconds, 1), **detail,
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    record["total_seconds"] = round(sum(r["seconds"] for r in record["runs"]), 1)
    write_json(record_path, record, indent=1)
    return record["total_seconds"]


# ------------------------------------------------------------------------------- machines
def fast_cpu_dtype() -> str:
    """bf16 where the CPU has bf16 units (AVX-512 BF16 or AMX: about 2.7x faster training
    here), else fp32: without them a bf16 matmul runs about 8x slower than fp32 (measured on
    an AVX2-only EPYC). On a GPU, "auto" (bf16)."""
    import torch

    if torch.cuda.is_available():
        return "auto"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def python_module(module: str, *args: str) -> list[str]:
    """The command that runs `module` (`benchmarks.NAME`) with this interpreter; run it with
    `cwd=ROOT`, where `-m` finds the package."""
    return [sys.executable, "-m", module, *args]


# -------------------------------------------------------------------------- typed budgets
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
Budget = TypeVar("Budget")


def parse_value(kind: Any, text: str) -> Any:
    """`text` as a value of the type `kind` (a resolved type hint): bool (true/false, 1/0,
    yes/no in any case, nothing else), int, float, str, tuples (comma-separated), and
    `X | None` ("none" for None)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() == "none":
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) != 1:
            raise TypeError(f"no parser for {kind}")
        return parse_value(others[0], text)
    if kind is bool:
        word = text.strip().lower()
        if word in TRUE + FALSE:
            return word in TRUE
        raise ValueError(f"{text!r} is not a boolean (true/false, 1/0, yes/no)")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {'an int' if kind is int else 'a float'}") from None
    if kind is str:
        return text
    if origin is tuple:
        items = [item.strip() for item in text.split(",")] if text.strip() else []
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(args[0], item) for item in items)
        if len(items) != len(args):
            raise ValueError(f"{text!r}: {len(args)} comma-separated values expected")
        return tuple(parse_value(a, item) for a, item in zip(args, items, strict=True))
    raise TypeError(f"no parser for {kind}")


def budget_setting(cls: type) -> Callable[[str], tuple[str, Any]]:
    """The argparse `type` of `--set KEY=VALUE` for the budget dataclass `cls`: (KEY, VALUE)
    with VALUE parsed by the field's type. An unknown key or a value that does not parse is
    an argparse error (exit 2) that names the field and its type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]

    def setting(item: str) -> tuple[str, Any]:
        key, equals, value = item.partition("=")
        if not equals:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
        if key not in names:
            raise argparse.ArgumentTypeError(
                f"unknown budget field {key!r}; the fields: {', '.join(names)}")
        try:
            return key, parse_value(hints[key], value)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(
                f"{key}={value!r}: {err} ({key} is {_type_name(hints[key])})") from None

    setting.__name__ = "KEY=VALUE"  # argparse names the type by it in its messages
    return setting


def add_budget_options(parser: argparse.ArgumentParser, budgets: dict[str, Any],
                       default: str, example: str) -> None:
    """`--budget NAME` (one of `budgets`) and `--set KEY=VALUE ...` typed by the budgets'
    dataclass; `example` shows a few settings in the help."""
    parser.add_argument("--budget", choices=sorted(budgets), default=default)
    cls = type(next(iter(budgets.values())))
    parser.add_argument("--set", nargs="*", default=[], type=budget_setting(cls),
                        metavar="KEY=VALUE", help="override budget fields, each parsed by its "
                        f"type, e.g. --set {example}")


def with_settings(parser: argparse.ArgumentParser, budget: Budget,
                  settings: list[tuple[str, Any]]) -> Budget:
    """`budget` with the parsed `--set` values; a combination the budget refuses (its
    __post_init__ raises ValueError) is a parser error too."""
    try:
        return dataclasses.replace(budget, **dict(settings))
    except ValueError as err:
        parser.error(f"--set: {err}")


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) if typing.get_origin(kind) is None else str(kind)
