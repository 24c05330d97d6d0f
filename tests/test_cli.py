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
    (["library", "ls", "{tmp}/missing"], "no library at"),
    (["library", "show", "{tmp}/lib", "nobody"], "no expert named"),
    (["library", "import-peft", "{tmp}/lib", "{tmp}/corrupt", "--name", "c"], "corrupt"),
    (["train", "--task", "arithmetic/1_digit_addition", "--library", "{tmp}/lib", "--name",
      "x", "--base", "tiny-llama", "--rank", "0"], "invalid TrainConfig"),
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
    done = quiver("tasks", "ls", "--kind", "mc", "--min-examples", 500, "--contains",
                  "logical_deduction")
    assert done.returncode == 0, done.stderr
    assert "logical_deduction/five_objects" in done.stdout
    assert "three_objects" not in done.stdout  # 300 examples only
    assert quiver("tasks", "ls", "--kind", "essay").returncode == 2


def test_merge_and_eval_commands(tmp_path):
    lib = tmp_path / "lib"
    for name, task in (("add", "arithmetic/1_digit_addition"),
                       ("sub", "arithmetic/1_digit_subtraction")):
        done = quiver("train", "--task", task, "--library", lib, "--name", name, "--base",
                      "tiny-llama", "--steps", 2, "--eval-every", 2, "--quiet")
        assert done.returncode == 0, done.stderr
    merged = quiver("merge", lib, "--method", "uniform-delta", "--name", "avg", "--rank", 4)
    assert merged.returncode == 0, merged.stderr
    assert "rank 4" in merged.stdout and "relative truncation error" in merged.stdout
    (tmp_path / "tasks.txt").write_text("# held out\narithmetic/2_digit_addition\n")
    out = tmp_path / "report.json"
    done = quiver("eval", "--method", "arrow", "--library", lib, "--base", "tiny-llama",
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
