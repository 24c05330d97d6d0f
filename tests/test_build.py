"""Building libraries: the strategies, the local and Ray executors, and `quiver build`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quiver.library.storage as storage
import quiver.training as training
from quiver.build import (
    BuildConfig,
    Job,
    build_library,
    check_tasks,
    expert_name,
    longest_first,
    private_jobs,
    random_clusters,
    run_jobs,
)
from quiver.errors import QuiverError
from quiver.library import Library
from quiver.training import train_expert

from .conftest import QUICK, jsonl_tasks, write_task

FAST = dataclasses.replace(QUICK, steps=4, eval_every=2)
QUIVER = [sys.executable, "-m", "quiver.cli"]


def some_tasks(folder, hows=("copy", "upper", "reverse")) -> list[str]:
    return jsonl_tasks(folder, hows)


def stored(library_url: str) -> dict[str, tuple[str, str]]:
    """`{name: (content hash, created)}`: what would change if an expert were trained again."""
    library = Library(library_url)
    return {n: (library.get(n).info.content_hash, library.get(n).info.created)
            for n in library.names()}


def leftovers(library_url: str) -> list[str]:
    """Staging folders left in the library's tmp/ (a half-written expert would be one)."""
    tmp = os.path.join(library_url, "tmp")
    return [n for n in os.listdir(tmp) if not n.startswith("trash-")] if os.path.isdir(tmp) else []


# ------------------------------------------------------------------------------ naming
def test_expert_names_are_short_valid_library_names():
    assert expert_name("bigbench:arithmetic/1_digit_addition") == "arithmetic.1_digit_addition"
    assert expert_name("gym:chain_sum?max_terms=3&size=50") == "chain_sum.max_terms-3.size-50"
    assert expert_name("jsonl:/data/my task (v2).jsonl") == "my_task_v2_"
    assert expert_name("hf:/data/flan#cot_gsm8k:2") == "cot_gsm8k_2"
    assert expert_name("hf:/data/flan/") == "flan"
    for task in ("bigbench:arithmetic/1_digit_addition", "jsonl:/x/.hidden.jsonl",
                 "jsonl:/x/é.jsonl"):
        storage.check_name(expert_name(task))


def test_two_tasks_that_would_share_an_expert_name_are_refused(tmp_path):
    tasks = [write_task(tmp_path / "a" / "t.jsonl"), write_task(tmp_path / "b" / "t.jsonl")]
    with pytest.raises(QuiverError, match="would both make an expert named 't'"):
        private_jobs(tasks)


def test_random_clusters_are_seeded_partitions_of_the_given_sizes():
    members = [f"e{i}" for i in range(10)]
    first = random_clusters(members, [5, 3, 2], seed=0)
    assert [len(m) for m in first.values()] == [5, 3, 2]
    assert list(first) == ["random0", "random1", "random2"]
    assert sorted(sum(first.values(), [])) == sorted(members)
    assert random_clusters(members[::-1], [5, 3, 2], seed=0) == first  # order-independent
    assert random_clusters(members, [5, 3, 2], seed=1) != first
    with pytest.raises(QuiverError, match="do not split"):
        random_clusters(members, [5, 3], seed=0)


# ------------------------------------------------------------------ private and shared
def test_private_build_trains_one_expert_per_task_and_a_rerun_skips_them(tmp_path):
    tasks = some_tasks(tmp_path / "tasks")
    lib = str(tmp_path / "lib")
    report = build_library(tasks, lib, "tiny-llama", FAST, BuildConfig(), show_progress=False)
    assert [o.name for o in report.outcomes] == ["copy", "upper", "reverse"]
    assert all(o.status == "trained" and o.attempts == 1 and o.steps == 4 for o in report.outcomes)
    library = Library(lib)
    assert {n: library.get(n).info.tasks for n in library.names()} == {
        "copy": [tasks[0]], "upper": [tasks[1]], "reverse": [tasks[2]]}
    before = stored(lib)

    again = build_library(tasks, lib, "tiny-llama", FAST, BuildConfig(), show_progress=False)
    assert [o.status for o in again.outcomes] == ["skipped"] * 3
    assert [o.best_valid_loss for o in again.outcomes] == [
        o.best_valid_loss for o in report.outcomes]
    assert stored(lib) == before  # same bytes, same creation time: nothing was trained again


def test_workers_zero_trains_one_per_core_at_one_thread_on_a_cpu(monkeypatch):
    from quiver.build import TRAINING_BYTES, local_workers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(training, "available_memory", lambda device: 100 * TRAINING_BYTES)
    assert local_workers(BuildConfig(), jobs=6, dtype="fp32") == (4, 1.0)
    assert local_workers(BuildConfig(), jobs=2, dtype="fp32") == (2, 2.0)  # cores shared out
    assert local_workers(BuildConfig(), jobs=1, dtype="fp32") == (1, 1.0)  # in this process
    assert local_workers(BuildConfig(workers=3, cpus_per_job=2), jobs=6) == (3, 2)  # as given
    monkeypatch.setattr(training, "available_memory", lambda device: 2.5 * TRAINING_BYTES)
    assert local_workers(BuildConfig(), jobs=6, dtype="fp32") == (2, 2.0)  # memory bounds it


def test_an_interrupted_build_resumes_where_it_stopped(tiny, tmp_path, monkeypatch):
    tasks = some_tasks(tmp_path / "tasks")
    lib = str(tmp_path / "lib")
    real_factor, steps_run = training.loop._lr_factor, []

    def crash_at_the_7th_step(step, steps, warmup):  # step 2 of the second expert
        if len(steps_run) == 6:
            raise KeyboardInterrupt
        steps_run.append(step)
        return real_factor(step, steps, warmup)

    monkeypatch.setattr(training.loop, "_lr_factor", crash_at_the_7th_step)
    with pytest.raises(KeyboardInterrupt):
        build_library(tasks, lib, "tiny-llama", FAST, BuildConfig(workers=1),
                      show_progress=False)
    assert Library(lib).names() == ["copy"]
    assert Library(lib).run_state("upper").read()[1]["step"] == 2  # saved at its validation

    steps_run.clear()
    monkeypatch.setattr(training.loop, "_lr_factor",
                        lambda *args: steps_run.append(args[0]) or real_factor(*args))
    report = build_library(tasks, lib, "tiny-llama", FAST, BuildConfig(workers=1),
                           show_progress=False)
    assert [o.status for o in report.outcomes] == ["skipped", "trained", "trained"]
    assert steps_run == [2, 3, 0, 1, 2, 3]  # upper resumed at step 2, reverse from scratch
    model, tokenizer = tiny
    from quiver.data import load_task

    uninterrupted, _ = train_expert(model, tokenizer, [load_task(tasks[1])], "upper", FAST,
                                    show_progress=False)
    resumed = Library(lib).get("upper")
    for key, value in uninterrupted.weights.items():
        torch.testing.assert_close(resumed.weights[key], value, rtol=0, atol=0)


def test_shared_expert_records_every_task(tmp_path):
    tasks = some_tasks(tmp_path / "tasks")
    lib = str(tmp_path / "lib")
    report = build_library(tasks, lib, "tiny-llama", FAST, BuildConfig(strategy="shared"),
                           show_progress=False)
    assert [(o.name, o.status) for o in report.outcomes] == [("shared", "trained")]
    info = Library(lib).get("shared").info
    assert info.tasks == tasks and info.training["train_examples"] == 3 * 18
    with pytest.raises(QuiverError, match="was trained on"):  # the name is taken by other tasks
        build_library(tasks[:2], lib, "tiny-llama", FAST, BuildConfig(strategy="shared"),
                      show_progress=False)


def test_a_failing_training_is_retried_once_then_reported_and_never_half_written(
        tmp_path, monkeypatch):
    tasks = some_tasks(tmp_path / "tasks")
    lib = str(tmp_path / "lib")
    real_write, failures = storage._write_synced, []

    def disk_full_for_upper(path, data):  # fails the add's last write: the manifest
        if path.endswith(storage.MANIFEST) and b'"name": "upper"' in data:
            failures.append(path)
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(storage, "_write_synced", disk_full_for_upper)
    report = build_library(tasks, lib, "tiny-llama", FAST, BuildConfig(workers=1),
                           show_progress=False)
    outcome = {o.name: o for o in report.outcomes}
    assert outcome["upper"].status == "failed" and outcome["upper"].attempts == 2
    assert "No space left on device" in outcome["upper"].error and len(failures) == 2
    assert outcome["copy"].status == outcome["reverse"].status == "trained"
    assert report.failed == [outcome["upper"]]
    assert Library(lib).names() == ["copy", "reverse"]
    assert not os.path.exists(os.path.join(lib, "experts", "upper")) and not leftovers(lib)
    assert Library(lib).run_state("upper").read() is not None  # the retry resumes from it

    monkeypatch.setattr(storage, "_write_synced", real_write)  # the disk has room again
    report = build_library(tasks, lib, "tiny-llama", FAST, BuildConfig(workers=1),
                           show_progress=False)
    assert [o.status for o in report.outcomes] == ["skipped", "trained", "skipped"]
    assert Library(lib).run_state("upper").read() is None  # cleared once stored


# ------------------------------------------------------------------------- validation
BAD_INPUTS = [
    (["no_such_task_anywhere"], {}, "unknown BIG-bench task"),
    (["jsonl:{tmp}/empty.jsonl"], {}, "no usable examples"),
    (["arithmetic/1_digit_addition", "bigbench:arithmetic/1_digit_addition"], {}, "listed twice"),
    (["jsonl:{tmp}/t/copy.jsonl", "jsonl:{tmp}/u/copy.jsonl"], {}, "would both make"),
    ([], {}, "no tasks"),
    (["jsonl:{tmp}/t/copy.jsonl", "jsonl:{tmp}/t/upper.jsonl"],
     {"strategy": "mbc", "clusters": 3}, "cannot make 3 clusters of 2 tasks"),
    (["jsonl:{tmp}/t/copy.jsonl"], {"strategy": "random", "clusters": 1}, "at least 2 tasks"),
    (["jsonl:{tmp}/t/copy.jsonl", "jsonl:{tmp}/t/upper.jsonl"],
     {"strategy": "mbc", "clusters": 2, "private": None}, "needs a private library"),
    (["jsonl:{tmp}/t/copy.jsonl"], {"strategy": "shared", "shared_name": "all tasks"},
     "bad expert name"),
]


@pytest.mark.parametrize("names, options, message", BAD_INPUTS)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, names, options, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    for folder in ("t", "u"):
        some_tasks(tmp_path / folder, ("copy", "upper"))
    options = dict(options)
    private = options.pop("private", str(tmp_path / "private"))
    tasks = [n.format(tmp=tmp_path) for n in names]
    with pytest.raises(QuiverError, match=message):
        build_library(tasks, str(tmp_path / "lib"), "tiny-llama", FAST, BuildConfig(**options),
                      private_url=private, show_progress=False)
    assert not (tmp_path / "lib").exists() and not (tmp_path / "private").exists()


def test_build_config_validates_and_round_trips_through_json():
    from quiver.config import from_dict, to_dict

    config = BuildConfig(strategy="mbc", clusters=4, executor="ray", address="10.0.0.1:6379",
                         gpus_per_job=0.5)
    assert from_dict(BuildConfig, json.loads(json.dumps(to_dict(config)))) == config
    for bad in ({"strategy": "mbc"}, {"strategy": "mbc", "clusters": 0},
                {"strategy": "private", "clusters": 2}, {"strategy": "experts"},
                {"executor": "slurm"}, {"cpus_per_job": 0}, {"retries": -1}):
        with pytest.raises(QuiverError, match="invalid BuildConfig"):
            from_dict(BuildConfig, bad)


# -------------------------------------------------------------------------- mbc, random
def test_mbc_and_random_libraries_from_a_private_library(tmp_path):
    tasks = some_tasks(tmp_path / "tasks", ("copy", "upper", "reverse", "first"))
    private, mbc, rnd = (str(tmp_path / n) for n in ("private", "mbc", "random"))
    report = build_library(tasks, mbc, "tiny-llama", FAST,
                           BuildConfig(strategy="mbc", clusters=2), private, show_progress=False)
    assert not report.failed
    assert [o.status for o in report.private] == ["trained"] * 4  # the private experts first
    assert Library(private).names() == ["copy", "first", "reverse", "upper"]
    clusters, meta = Library(mbc).get_clusters("mbc")
    assert list(clusters) == ["cluster0", "cluster1"] == Library(mbc).names()
    assert sorted(sum(clusters.values(), [])) == Library(private).names()
    for name, members in clusters.items():  # each cluster expert learns its members' tasks
        assert sorted(Library(mbc).get(name).info.tasks) == sorted(
            Library(private).get(m).info.tasks[0] for m in members)
        assert meta["tasks"][name] == Library(mbc).get(name).info.tasks
    assert meta["config"]["k"] == 2 and meta["private_library"] == private

    report = build_library(tasks, rnd, "tiny-llama", FAST,
                           BuildConfig(strategy="random", clusters=2), private,
                           show_progress=False)
    assert [o.status for o in report.private] == ["skipped"] * 4  # found, not retrained
    random_record, random_meta = Library(rnd).get_clusters("random")
    sizes = [len(m) for m in clusters.values()]
    assert [len(m) for m in random_record.values()] == sizes  # MBC's sizes
    assert random_record == random_clusters(Library(private).names(), sizes, seed=0)  # seeded
    assert random_meta["sizes_from"] == clusters
    assert Library(rnd).names() == ["random0", "random1"]


# ------------------------------------------------------------------------------ the CLI
def quiver(*args):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*QUIVER, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_build_command_builds_then_skips(tmp_path):
    tasks_file = tmp_path / "tasks.txt"
    tasks_file.write_text("\n".join(["# two tiny tasks", *some_tasks(tmp_path, ("copy", "upper"))]))
    args = ["build", "--tasks-file", tasks_file, "--library", tmp_path / "lib", "--base",
            "tiny-llama", "--steps", 2, "--eval-every", 2, "--batch-size", 4, "--quiet"]
    done = quiver(*args)
    assert done.returncode == 0, done.stderr
    assert "private library" in done.stdout and done.stdout.count("trained") == 2
    again = quiver(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped") == 2 and "trained" not in again.stdout


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "mbc", "--clusters", "0", "--private", "{tmp}/private"],
     "invalid BuildConfig: strategy mbc needs a number of clusters K >= 1"),
    (["--strategy", "mbc", "--clusters", "5", "--private", "{tmp}/private"],
     "cannot make 5 clusters of 2 tasks"),
    (["--target-modules", "c_attn"], "this tiny-llama model has no linear layer named c_attn; "
     "its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
])
def test_build_command_refuses_bad_input_with_exit_code_2(tmp_path, extra, message):
    tasks_file = tmp_path / "tasks.txt"
    tasks_file.write_text("\n".join(some_tasks(tmp_path, ("copy", "upper"))))
    done = quiver("build", "--tasks-file", tasks_file, "--library", tmp_path / "lib",
                  "--base", "tiny-llama", *[a.format(tmp=tmp_path) for a in extra])
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "lib").exists() and not (tmp_path / "private").exists()


# -------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster: a head without CPUs and two one-CPU worker nodes."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    memory = 80 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": memory, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=memory)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.ray
def test_ray_build_from_the_command_line_lands_every_expert(ray_cluster, tmp_path):
    tasks_file = tmp_path / "tasks.txt"
    tasks_file.write_text("\n".join(some_tasks(tmp_path / "tasks")))
    done = quiver("build", "--tasks-file", tasks_file, "--library", tmp_path / "lib",
                  "--executor", "ray", "--address", ray_cluster.address, "--base", "tiny-llama",
                  "--steps", 4, "--eval-every", 2, "--batch-size", 4, "--quiet")
    assert done.returncode == 0, done.stderr
    assert Library(str(tmp_path / "lib")).names() == ["copy", "reverse", "upper"]
    assert done.stdout.count("trained") == 3


@pytest.mark.ray
def test_ray_failed_job_is_retried_once_then_reported(ray_cluster, tmp_path):
    tasks = some_tasks(tmp_path / "tasks")
    lib = str(tmp_path / "lib")
    jobs = private_jobs(list(check_tasks(tasks)))  # validated...
    path = Path(tasks[1].removeprefix("jsonl:"))
    good = path.read_text()
    path.write_text(good + "{not json\n")  # ...then the data changes under the build
    config = BuildConfig(executor="ray", address=ray_cluster.address)
    outcomes = {o.name: o for o in run_jobs(jobs, lib, "tiny-llama", FAST, config,
                                            show_progress=False)}
    assert outcomes["upper"].status == "failed" and outcomes["upper"].attempts == 2
    assert "not a valid example" in outcomes["upper"].error
    assert outcomes["copy"].status == outcomes["reverse"].status == "trained"
    assert Library(lib).names() == ["copy", "reverse"] and not leftovers(lib)

    path.write_text(good)
    outcomes = run_jobs(jobs, lib, "tiny-llama", FAST, config, show_progress=False)
    assert [o.status for o in outcomes] == ["skipped", "trained", "skipped"]
    assert Library(lib).names() == ["copy", "reverse", "upper"]


def test_local_workers_train_in_parallel_processes_like_one_after_another(tmp_path):
    tasks = some_tasks(tmp_path / "tasks")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker process: the same float order, the same weights
    try:
        build_library(tasks, one, "tiny-llama", FAST, BuildConfig(workers=1),
                      show_progress=False)
    finally:
        torch.set_num_threads(threads)
    path = Path(tasks[1].removeprefix("jsonl:"))
    good = path.read_text()
    path.write_text(good + "{not json\n")  # the data breaks after the checks: upper fails
    jobs = private_jobs([tasks[0], tasks[2]]) + private_jobs([tasks[1]])
    outcomes = {o.name: o for o in run_jobs(jobs, two, "tiny-llama", FAST,
                                            BuildConfig(workers=2), show_progress=False)}
    assert outcomes["upper"].status == "failed" and outcomes["upper"].attempts == 2
    assert "not a valid example" in outcomes["upper"].error
    assert Library(two).names() == ["copy", "reverse"] and not leftovers(two)
    path.write_text(good)
    report = build_library(tasks, two, "tiny-llama", FAST, BuildConfig(workers=2),
                           show_progress=False)
    assert [o.status for o in report.outcomes] == ["skipped", "trained", "skipped"]
    # each process trains exactly the weights the in-process build did (seeded, same data,
    # one thread each)
    for name in ("copy", "upper", "reverse"):
        a, b = Library(one).get(name).weights, Library(two).get(name).weights
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parallel_builds_start_the_jobs_with_the_longest_examples_first(tmp_path):
    short = write_task(tmp_path / "short.jsonl", "first")
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "word " * 40 + f"{i}\nAnswer:",
                                        "target": " word"}) + "\n" for i in range(8)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")  # unreadable now: ordered last, its job says why
    jobs = private_jobs([short, f"jsonl:{broken}", f"jsonl:{long}"])
    assert [job.name for job in longest_first(jobs)] == ["long", "short", "broken"]
    clusters = [Job("a", (short, f"jsonl:{long}")), Job("b", (short,))]  # a task mix: its mean
    assert [job.name for job in longest_first(clusters)] == ["a", "b"]
    # the lengths check_tasks measured are used as they are: the tasks are not read again
    measured = check_tasks([short, f"jsonl:{long}"])
    long.unlink()
    assert [job.name for job in longest_first(private_jobs(list(measured)), measured)] == [
        "long", "short"]


def test_building_sits_below_recipes_and_reports_data_flows_one_way():
    probe = ("import sys, quiver.build; "
             "print(sorted(m for m in sys.modules if m in ('quiver.recipes', 'quiver.report')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
