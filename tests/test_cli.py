"""The command line, run as a user runs it: `quiver ...` in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

QUIVER = [sys.executable, "-m", "quiver.cli"]


def quiver(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*QUIVER, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_train_list_show_export_and_remove(tmp_path):
    lib = tmp_path / "lib"
    done = quiver("train", "--task", "arithmetic/1_digit_addition", "--task",
                  "arithmetic/1_digit_subtraction", "--library", lib, "--name", "arith",
                  "--base", "tiny-llama", "--steps", 4, "--eval-every", 2, "--rank", 2,
                  "--target-modules", "q_proj", "--target-modules", "v_proj", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "added arith" in done.stdout
    listing = quiver("library", "ls", lib)
    assert listing.returncode == 0 and "arith" in listing.stdout and "1 experts" in listing.stdout
    shown = quiver("library", "show", lib, "arith")
    info = json.loads(shown.stdout)
    assert info["info"]["tasks"] == ["bigbench:arithmetic/1_digit_addition",
                                     "bigbench:arithmetic/1_digit_subtraction"]
    assert info["adapter_config"]["r"] == 2
    assert sorted(info["adapter_config"]["target_modules"]) == ["q_proj", "v_proj"]
    assert quiver("library", "export-peft", lib, "arith", tmp_path / "out").returncode == 0
    assert (tmp_path / "out" / "adapter_config.json").exists()
    imported = quiver("library", "import-peft", lib, tmp_path / "out", "--name", "again",
                      "--task", "bigbench:arithmetic")
    assert imported.returncode == 0, imported.stderr
    assert quiver("library", "rename", lib, "again", "copy").returncode == 0
    assert quiver("library", "rm", lib, "copy").returncode == 0
    assert "copy" not in quiver("library", "ls", lib).stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--task", "no_such_task", "--library", "{tmp}/new", "--name", "x",
      "--base", "tiny-llama"], "unknown BIG-bench task"),
    (["train", "--task", "jsonl:{tmp}/empty.jsonl", "--library", "{tmp}/new", "--name", "x",
      "--base", "tiny-llama"], "no usable examples"),
    (["train", "--task", "gym:basic_arithmetic?size=20", "--library", "{tmp}/new", "--name",
      "x", "--base", "tiny-llama", "--target-modules", "c_attn"],
     "has no linear layer named c_attn; its linear layers are down_proj"),
    (["library", "ls", "{tmp}/missing"], "no library at"),
    (["library", "show", "{tmp}/lib", "nobody"], "no expert named"),
    (["library", "import-peft", "{tmp}/lib", "{tmp}/corrupt", "--name", "c"], "corrupt"),
    (["train", "--task", "arithmetic/1_digit_addition", "--library", "{tmp}/lib", "--name",
      "x", "--base", "tiny-llama", "--rank", "0"], "invalid TrainConfig"),
    (["cluster", "{tmp}/lib", "--k", "2", "--out", "{tmp}/new/c.json"],
     "at least 2 experts, got 0"),
    (["cluster", "{tmp}/lib", "--k", "zero"], "invalid MBCConfig"),
    (["transfer", "{tmp}/lib", "--task", "arithmetic/1_digit_addition", "--metric", "bleu"],
     "invalid TransferConfig"),
    (["transfer", "{tmp}/lib", "--out", "{tmp}/new/t.json"], "no tasks"),
])
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, args, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "lib" / "experts").mkdir(parents=True)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    done = quiver(*[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not Path(tmp_path / "new").exists()  # nothing written


def test_tasks_ls_on_a_flan_dataset(tmp_path):
    import datasets

    rows = {"source": ["a", "b", "c"], "target": ["A", "B", "C"],
            "task_name": ["t1", "t2", "t1"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "flan"))
    done = quiver("tasks", "ls", "--source", f"hf:{tmp_path / 'flan'}", "--min-examples", 2)
    assert done.returncode == 0, done.stderr
    assert "#t1" in done.stdout and "#t2" not in done.stdout


def test_tasks_ls_bigbench_filters(tmp_path):
    done = quiver("tasks", "ls", "--source", "bigbench", "--kind", "mc", "--min-examples", 40,
                  "--contains", "logical_deduction")
    assert done.returncode == 0, done.stderr
    assert "logical_deduction/five_objects" in done.stdout
    assert "three_objects" not in done.stdout  # 30 examples only
    assert quiver("tasks", "ls", "--kind", "essay").returncode == 2


def test_merge_and_eval_commands(tmp_path):
    """Only the first command names the base model: the others take the library's."""
    lib = tmp_path / "lib"
    for name, task, base in (("add", "arithmetic/1_digit_addition", ["--base", "tiny-llama"]),
                             ("sub", "arithmetic/1_digit_subtraction", [])):
        done = quiver("train", "--task", task, "--library", lib, "--name", name, *base,
                      "--steps", 2, "--eval-every", 2, "--quiet")
        assert done.returncode == 0, done.stderr
    merged = quiver("merge", lib, "--method", "uniform-delta", "--name", "avg", "--rank", 4)
    assert merged.returncode == 0, merged.stderr
    assert "rank 4" in merged.stdout and "relative truncation error" in merged.stdout
    (tmp_path / "tasks.txt").write_text("# held out\narithmetic/2_digit_addition\n")
    out = tmp_path / "report.json"
    done = quiver("eval", "--method", "arrow", "--library", lib,
                  "--tasks-file", tmp_path / "tasks.txt", "--limit", 3, "--out", out,
                  "--routing-plot", tmp_path / "routing.png")
    assert done.returncode == 0, done.stderr
    assert "average" in done.stdout
    report = json.loads(out.read_text())
    assert report["tasks"]["bigbench:arithmetic/2_digit_addition"]["examples"] == 3
    assert report["experts"] == ["add", "avg", "sub"]
    assert (tmp_path / "routing.png").stat().st_size > 1000
    assert len(report["routing"]) == 14 and all(sum(c) > 0 for c in report["routing"].values())
    seen = quiver("eval", "--method", "expert:add", "--library", lib, "--base", "tiny-llama",
                  "--task", "arithmetic/1_digit_addition", "--limit", 2)
    assert seen.returncode == 2 and "not zero-shot" in seen.stderr


def _three_expert_library(tiny_library, path: Path) -> Path:
    """A copy of the tiny library plus `alpha2`: alpha's weights scaled, so alpha's kin."""
    import shutil

    import torch

    from quiver.library import Expert, ExpertInfo, Library

    shutil.copytree(tiny_library.url, path)
    library = Library(str(path))
    alpha = library.get("alpha")
    generator = torch.Generator().manual_seed(0)
    weights = {k: 1.5 * v + 1e-3 * torch.randn(v.shape, generator=generator)
               for k, v in alpha.weights.items()}
    info = ExpertInfo(**{**alpha.info.__dict__, "name": "alpha2", "tasks": ["toy:alpha2"]})
    library.add(Expert(info, alpha.adapter_config, weights=weights))
    return path


def test_cluster_command(tiny_library, tmp_path):
    lib = _three_expert_library(tiny_library, tmp_path / "lib")
    out, plot = tmp_path / "clusters.json", tmp_path / "plots" / "heatmap.png"
    done = quiver("cluster", lib, "--k", 2, "--out", out, "--plot", plot, "--save-as", "mbc2")
    assert done.returncode == 0, done.stderr
    expected = {"cluster0": ["alpha", "alpha2"], "cluster1": ["beta"]}
    assert json.loads(out.read_text()) == expected
    assert plot.stat().st_size > 5000
    assert "cluster0" in done.stdout and "toy:alpha2" in done.stdout
    from quiver.library import Library

    clusters, meta = Library(str(lib)).get_clusters("mbc2")
    assert clusters == expected and meta["tasks"]["beta"] == ["toy:beta"]
    too_many = quiver("cluster", lib, "--k", 4, "--out", tmp_path / "no.json")
    assert too_many.returncode == 2 and "Traceback" not in too_many.stderr
    assert "k=4 clusters is more than the 3 experts" in too_many.stderr
    assert not (tmp_path / "no.json").exists()


def test_cluster_auto_in_process(tiny_library, tmp_path, monkeypatch, capsys):
    """`--k auto` through the real entry point, in this process (a subprocess costs ~8 s)."""
    from quiver.cli import main

    lib = _three_expert_library(tiny_library, tmp_path / "lib")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["quiver", "cluster", str(lib), "--k", "auto",
                                      "--silhouette-plot", str(tmp_path / "s.png")])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    assert "chose k=2" in capsys.readouterr().out
    assert (tmp_path / "s.png").stat().st_size > 5000


def test_transfer_command(tiny_library, tmp_path):
    lib = _three_expert_library(tiny_library, tmp_path / "lib")
    for name in ("copy", "echo"):
        lines = [json.dumps({"prompt": f"Say: {name} {i}\nAnswer:", "target": f" {name} {i}"})
                 for i in range(40)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "tasks.txt").write_text(f"jsonl:{tmp_path / 'copy.jsonl'}\n"
                                        f"jsonl:{tmp_path / 'echo.jsonl'}\n")
    out, plot = tmp_path / "transfer.json", tmp_path / "transfer.png"
    done = quiver("transfer", lib, "--tasks-file", tmp_path / "tasks.txt", "--limit", 3,
                  "--base", "tiny-llama", "--out", out, "--plot", plot, "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert list(report["values"]) == ["base", "alpha", "alpha2", "beta"]
    assert report["metric"] == "loss" and len(report["tasks"]) == 2
    assert all(len(row) == 2 and all(v > 0 for v in row.values())
               for row in report["values"].values())
    assert plot.stat().st_size > 5000
    assert "transfer matrix" in done.stdout and "alpha2" in done.stdout


_HELP_OF_EVERY_COMMAND = """
import sys
import click, typer
from quiver.cli import app

def paths(group, prefix):
    yield prefix
    for name, command in getattr(group, "commands", {}).items():
        yield from paths(command, prefix + [name])

root = typer.main.get_command(app)
helped = []
for path in paths(root, []):
    if path == ["lm-eval"]:  # hands its arguments, --help too, to lm-eval's own command line
        continue
    try:
        root.main(path + ["--help"], prog_name="quiver", standalone_mode=False)
    except SystemExit:
        pass
    helped.append(" ".join(path))
heavy = [m for m in ("torch", "transformers", "peft", "numpy", "sklearn") if m in sys.modules]
print(len(helped), heavy)
"""


def test_help_of_every_command_imports_no_torch():
    """`quiver --help` and `quiver COMMAND --help` must not pay torch's start-up (seconds):
    the CLI reads only config dataclasses, which import no torch, transformers or peft."""
    out = subprocess.run([sys.executable, "-c", _HELP_OF_EVERY_COMMAND], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    count, heavy = out.split(" ", 1)
    assert int(count) >= 20 and heavy == "[]", out  # 20+: the commands and their groups
