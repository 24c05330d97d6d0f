"""The benchmarks package (benchmarks/): typed budgets and `--set`, imports that run one way
and without sys.path edits, the results' provenance, the writers and the local-server
helpers. No model runs here: everything is seconds."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import (
    adaptation,
    budget_sweep,
    common,
    families,
    local_server,
    report_families,
    zero_shot,
)

BENCHMARKS = common.ROOT / "benchmarks"
RESULTS = common.RESULTS
# A results page names its run in its first lines: "`COMMAND` at commit `abc1234`, MACHINE"
# (as common.provenance_line writes it; older pages "... at commit abc1234 on MACHINE"), or
# "Made by hand ... at commit `abc1234` on MACHINE" where no command made it.
RUN_LINE = re.compile(r"`(?P<command>[^`]+)` at commit `?(?P<commit>[0-9a-f]{7,40})`?"
                      r"(?:,| on) (?P<machine>[^;]+)")
HAND_LINE = re.compile(r"[Mm]ade by hand\b.*? at commit `(?P<commit>[0-9a-f]{7,40})`"
                       r"(?:,| on) (?P<machine>[^;(]+)")
COMMIT = re.compile(r"[0-9a-f]{7,40}")
BUDGET_CLASSES = [(zero_shot, zero_shot.Budget), (families, families.Budget),
                  (adaptation, adaptation.Budget)]


# ------------------------------------------------------------------------- typed --set
@pytest.mark.parametrize("text", ["true", "TRUE", "True", "1", "yes", "Yes", " yes "])
def test_bool_settings_that_mean_true(text):
    assert common.parse_value(bool, text) is True


@pytest.mark.parametrize("text", ["false", "False", "FALSE", "0", "no", "NO"])
def test_bool_settings_that_mean_false(text):
    assert common.parse_value(bool, text) is False


@pytest.mark.parametrize("text", ["", "maybe", "2", "tru", "off", "none"])
def test_bool_settings_refuse_anything_else(text):
    with pytest.raises(ValueError, match="not a boolean"):
        common.parse_value(bool, text)


def test_values_parse_by_their_type():
    assert common.parse_value(int, "30") == 30
    assert common.parse_value(float, "5e-4") == 5e-4
    assert common.parse_value(str, "bf16") == "bf16"
    assert common.parse_value(tuple[str, ...], "params,update") == ("params", "update")
    assert common.parse_value(tuple[int, ...], "16, 64") == (16, 64)
    assert common.parse_value(tuple[int, ...], "") == ()
    assert common.parse_value(tuple[str, ...] | None, "None") is None
    assert common.parse_value(int | None, "7") == 7
    for kind, text in ((int, "1.5"), (int, "ten"), (float, "fast"), (tuple[int, ...], "1,x")):
        with pytest.raises(ValueError):
            common.parse_value(kind, text)


def test_calibrate_false_is_false():
    """The bug this replaces: `bool("False")` is True. The large budget calibrates; --set
    calibrate=False must turn it off."""
    parser = zero_shot.make_parser()
    assert zero_shot.BUDGETS["large"].calibrate is True
    args = parser.parse_args(["--budget", "large", "--set", "calibrate=False", "limit=30",
                              "spaces=update", "lr=1e-3", "--libraries", "private,mbc-update"])
    budget = zero_shot.budget_of(parser, args)
    assert budget.calibrate is False and budget.limit == 30 and budget.lr == 1e-3
    assert budget.spaces == ("update",) and budget.libraries == ("private", "mbc-update")
    assert budget.dtype in ("bf16", "fp32", "auto")  # "fast" resolved on this machine
    assert budget.select == zero_shot.BUDGETS["large"].select  # the rest as it was


@pytest.mark.parametrize("module, setting, message", [
    (zero_shot, "calibrate=perhaps", "calibrate='perhaps'"),
    (zero_shot, "random=", "is not a boolean"),
    *[(module, setting, message) for module in (zero_shot, families, adaptation)
      for setting, message in (("limit=many", "limit='many'"), ("lr=fast", "is not a float"),
                               ("no_such_field=1", "unknown budget field 'no_such_field'"),
                               ("limit", "is not KEY=VALUE"))],
], ids=str)
def test_a_bad_setting_is_one_argparse_error(module, setting, message, capsys):
    with pytest.raises(SystemExit) as stop:
        module.make_parser().parse_args(["--set", setting])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "argument --set" in error and message in error


@pytest.mark.parametrize("module, argv, message", [
    (adaptation, ["--budget", "small", "--set", "shots=16,64"], "must be as long"),
    (zero_shot, ["--set", "spaces=params,weights"], "spaces"),
    (zero_shot, ["--set", "held_out=99"], "held_out 99"),
])
def test_a_budget_that_refuses_its_settings_is_an_argparse_error(module, argv, message, capsys):
    parser = module.make_parser()
    args = parser.parse_args(argv)
    with pytest.raises(SystemExit) as stop:
        common.with_settings(parser, module.BUDGETS[args.budget], args.set)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def _as_setting(value) -> str:
    """A field's value as `--set` takes it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


@pytest.mark.parametrize("module, cls", BUDGET_CLASSES, ids=lambda x: getattr(x, "__name__", ""))
def test_every_budget_round_trips_through_set_and_json(module, cls):
    """Each named budget, written field by field as `--set` values and parsed onto another
    budget, is itself again; and so is its JSON record (results files keep `asdict`)."""
    parser = module.make_parser()
    hints = typing.get_type_hints(cls)
    budgets = list(module.BUDGETS.values())
    assert all(isinstance(b, cls) for b in budgets) and len(budgets) > 1
    for i, budget in enumerate(budgets):
        other = budgets[(i + 1) % len(budgets)]
        assert other != budget  # so the round trip has something to change
        items = [f"{f.name}={_as_setting(getattr(budget, f.name))}"
                 for f in dataclasses.fields(cls)]
        args = parser.parse_args(["--set", *items])
        assert common.with_settings(parser, other, args.set) == budget
        record = json.loads(json.dumps(dataclasses.asdict(budget)))
        assert set(record) == set(hints)
        again = cls(**{key: tuple(value) if isinstance(value, list) else value
                       for key, value in record.items()})
        assert again == budget
        with pytest.raises(dataclasses.FrozenInstanceError):
            budget.limit = 1  # budgets are values: a run cannot change its own


def test_budget_sweep_settings_parse_by_their_fields():
    setting = budget_sweep.Setting.parse("120,5e-4,256")
    assert setting == budget_sweep.Setting(120, 0.0005, 256) and isinstance(setting.lr, float)
    assert [budget_sweep.Setting.parse(f"{s.steps},{s.lr!r},{s.max_length}")
            for s in budget_sweep.SETTINGS] == budget_sweep.SETTINGS
    for text in ("30,0.001", "30,abc,256", "3.5,0.001,256"):
        with pytest.raises(Exception, match=re.escape(repr(text))):
            budget_sweep.Setting.parse(text)


def test_families_builds_its_libraries_with_a_zero_shot_budget():
    """families.py hands zero_shot.build_libraries a typed budget of the gym list (it used
    to patch zero_shot's task lists and pass a dict)."""
    plan = families.build_plan(families.BUDGETS["cpu"])
    assert isinstance(plan, zero_shot.Budget)
    assert zero_shot.train_tasks(plan) == families.gym_lists.TRAIN[:24]
    assert set(zero_shot.cluster_labels(plan)) == {"mbc", "mbc-update"}
    assert plan.methods == ("uniform merge",) and plan.random is False


# ------------------------------------------------------------------------------- imports
def _benchmark_modules() -> list[str]:
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")


def _imports_of(path: Path) -> set[str]:
    """The benchmarks modules one file imports, anywhere in it (functions included)."""
    names = set(_benchmark_modules())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import inside the package
                module = node.module or ""
                found |= {module.split(".")[0]} if module else {a.name for a in node.names}
            elif node.module == "benchmarks":
                found |= {a.name for a in node.names}
            elif node.module and node.module.startswith("benchmarks."):
                found.add(node.module.split(".")[1])
            elif node.module in names:  # the old `from stats import ...` (a sys.path edit)
                found.add(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "benchmarks" and len(parts) > 1:
                    found.add(parts[1])
                elif parts[0] in names:
                    found.add(parts[0])
    return found & names


def test_benchmark_modules_import_each_other_one_way():
    graph = {name: _imports_of(BENCHMARKS / f"{name}.py") for name in _benchmark_modules()}
    assert "zero_shot" not in graph["zero_shot_analysis"]
    assert graph["zero_shot"] >= {"zero_shot_analysis", "stats", "common"}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import circle: {' -> '.join(path + [name])}"
        state[name] = "open"
        for other in sorted(graph[name]):
            visit(other, path + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])


def test_the_circle_finder_sees_a_circle(tmp_path):
    """The import scan reads `from benchmarks import x` and `from benchmarks.x import y`."""
    (tmp_path / "a.py").write_text("from benchmarks import zero_shot\n"
                                   "def f():\n    from benchmarks.stats import interval\n")
    assert _imports_of(tmp_path / "a.py") == {"zero_shot", "stats"}


def test_nothing_in_benchmarks_edits_sys_path():
    offenders = [str(p.relative_to(common.ROOT)) for p in sorted(BENCHMARKS.rglob("*"))
                 if p.suffix in (".py", ".sh") and "sys.path" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("name", _benchmark_modules())
def test_every_benchmark_module_imports_as_part_of_the_package(name):
    assert importlib.import_module(f"benchmarks.{name}").__name__ == f"benchmarks.{name}"


def test_a_benchmark_runs_as_a_module_from_the_repository_root():
    """`python -m benchmarks.NAME`, no PYTHONPATH: -m puts the root on the path itself."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.families", "--help"],
                          cwd=common.ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--report-only" in done.stdout


def test_command_line_is_the_module_form(monkeypatch):
    main = SimpleNamespace(__spec__=SimpleNamespace(name="benchmarks.routing"))
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/x/benchmarks/routing.py", "--experts", "8", "32",
                                      "--tasks", "gym:chain_sum?max_digits=2&max_terms=2"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert common.command_line() == ("python -m benchmarks.routing --experts 8 32 --tasks "
                                     "'gym:chain_sum?max_digits=2&max_terms=2'")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert common.command_line().startswith("OMP_NUM_THREADS=1 python -m benchmarks.routing ")


# ---------------------------------------------------------------------------- provenance
def _provenance_of_page(path: Path) -> re.Match | None:
    head = "\n".join(path.read_text().splitlines()[:8])
    return RUN_LINE.search(head) or HAND_LINE.search(head)


def test_a_new_record_says_where_it_came_from():
    record = common.provenance(device="cpu")
    assert record["command"] and COMMIT.fullmatch(record["commit"]) and record["machine"]
    found = RUN_LINE.search(common.provenance_line(record))
    assert found and found["command"] == record["command"]
    assert found["commit"] == record["commit"]
    assert found["machine"].startswith(record["machine"])


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_json_result_names_its_command_commit_and_machine(path):
    record = json.loads(path.read_text())
    assert isinstance(record, dict)
    assert isinstance(record.get("command"), str) and record["command"].strip()
    assert COMMIT.fullmatch(str(record.get("commit"))), record.get("commit")
    assert isinstance(record.get("machine"), str) and record["machine"].strip()


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.md")), ids=lambda p: p.name)
def test_every_markdown_result_names_its_command_commit_and_machine(path):
    found = _provenance_of_page(path)
    assert found, f"{path.name}: no provenance line in its first lines"
    assert found["machine"].strip()
    twin = path.with_suffix(".json")
    if twin.exists():  # the two files of one run name one commit
        assert json.loads(twin.read_text())["commit"] == found["commit"]


def test_every_plot_is_referenced_by_a_page():
    pages = "\n".join(p.read_text() for p in [*RESULTS.glob("*.md"), BENCHMARKS / "README.md"])
    orphans = [p.name for p in sorted(RESULTS.glob("*.png")) if p.name not in pages]
    assert orphans == []


def test_the_results_commits_are_in_the_history():
    """Every commit a result names exists (a typo would name none)."""
    if subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=common.ROOT,
                      capture_output=True, text=True).stdout.strip() != "false":
        pytest.skip("not a full git checkout")
    commits = {json.loads(p.read_text())["commit"] for p in RESULTS.glob("*.json")}
    commits |= {_provenance_of_page(p)["commit"] for p in RESULTS.glob("*.md")}
    done = subprocess.run(["git", "cat-file", "--batch-check"], cwd=common.ROOT, text=True,
                          input="".join(f"{c}^{{commit}}\n" for c in sorted(commits)),
                          capture_output=True)
    assert "missing" not in done.stdout, done.stdout


def test_the_benchmarks_readme_links_resolve_inside_the_repository():
    text = (BENCHMARKS / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)", text)
    assert targets, "the index links its results"
    for target in targets:
        assert "://" not in target and not target.startswith("/"), target
        resolved = (BENCHMARKS / target).resolve()
        assert resolved.is_relative_to(common.ROOT), target
        assert resolved.exists(), target
    commands = "".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    assert "-m benchmarks." in commands
    assert not re.search(r"benchmarks/\w+\.py", commands), "benchmarks run as modules"


# ------------------------------------------------------------------------------- writers
def _report(label: str, hits: dict[str, list[int]]) -> dict:
    return {"label": label, "seconds": 1.0, "experts": ["a", "b"],
            "average": {"accuracy": float(np.mean([100 * np.mean(h) for h in hits.values()]))},
            "tasks": {t: {"accuracy": 100 * float(np.mean(h)), "examples": len(h),
                          "per_example": {"accuracy": h}} for t, h in hits.items()}}


def test_zero_shot_writes_a_table_that_names_its_run(tmp_path):
    """Arrow gets all of t1 that the base misses and the same t2 examples: +100 and 0
    points on every resample, +50 on average."""
    hits = {"bigbench:t1": [0, 0, 0, 0], "bigbench:t2": [0, 1, 1, 0, 1]}
    better = {"bigbench:t1": [1, 1, 1, 1], "bigbench:t2": [0, 1, 1, 0, 1]}
    reports = [_report("base", hits), _report("uniform merge", hits),
               _report("Arrow private", better)]
    summary = zero_shot.summarise(reports)
    assert summary["target"] == "Arrow private"
    assert summary["paired"]["base"] == {"difference": pytest.approx(50),
                                         "ci": (pytest.approx(50), pytest.approx(50))}
    record = common.provenance(device="cpu")
    args = SimpleNamespace(results=tmp_path, budget="smoke")
    zero_shot.write(args, zero_shot.BUDGETS["smoke"], reports, summary, {}, {"build": 60,
                    "evaluate": 120}, record)
    written = json.loads((tmp_path / "zero_shot_smoke.json").read_text())
    assert {k: written[k] for k in ("command", "commit", "machine")} == {
        k: record[k] for k in ("command", "commit", "machine")}
    assert written["budget"]["split"] == "test"
    page = tmp_path / "zero_shot_smoke.md"
    assert _provenance_of_page(page)["commit"] == record["commit"]
    assert "(zero_shot_smoke.png)" in page.read_text()
    assert (tmp_path / "zero_shot_smoke.png").stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))  # the atomic writes left nothing behind


def test_families_pages_render_from_their_committed_record():
    """--report-only's path: the committed JSON alone makes the page, provenance first."""
    record = json.loads((RESULTS / "families_cpu.json").read_text())
    page = report_families.markdown(record, "families_cpu_bars.png")
    found = RUN_LINE.search("\n".join(page.splitlines()[:8]))
    assert found and found["commit"] == record["commit"]
    assert "(families_cpu_bars.png)" in page


def test_atomic_writes_replace_whole_files(tmp_path):
    path = tmp_path / "deep" / "record.json"
    common.write_json(path, {"a": 1}, indent=1)
    common.write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


def test_record_time_sums_the_runs_into_one_folder(tmp_path):
    path = tmp_path / "build_time.json"
    assert common.recorded_time(path) == 0.0
    assert common.record_time(path, 60.04, {"made": 3}) == 60.0
    assert common.record_time(path, 30.0, {"made": 1}) == 90.0
    assert [r["made"] for r in json.loads(path.read_text())["runs"]] == [3, 1]


# -------------------------------------------------------------------------- local server
class _Health(BaseHTTPRequestHandler):
    answers: list[dict] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps(self.answers.pop(0) if len(self.answers) > 1 else self.answers[0])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_free_port_is_free():
    port = local_server.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if something held it


def test_wait_until_healthy_waits_for_ok(fake_server):
    _Health.answers = [{"status": "starting"}, {"status": "ok", "accepted": 0}]
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        answer = local_server.wait_until_healthy(fake_server.server_port, waiting, timeout=10)
    finally:
        waiting.kill()
    assert answer == {"status": "ok", "accepted": 0}


def test_wait_until_healthy_stops_when_the_server_exits():
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    gone.wait()
    with pytest.raises(local_server.ServerNotUp, match="code 3"):
        local_server.wait_until_healthy(local_server.free_port(), gone, timeout=10)


def test_wait_until_idle_waits_for_no_accepted_request(fake_server):
    _Health.answers = [{"status": "ok", "accepted": 2}, {"status": "ok", "accepted": 1},
                       {"status": "ok", "accepted": 0}]
    assert local_server.wait_until_idle(fake_server.server_port)["accepted"] == 0
