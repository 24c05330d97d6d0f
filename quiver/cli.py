"""`quiver ...`: a thin command line over the library's public functions.

Every subcommand is a few lines that call one function. Bad input raises `QuiverError`, which
`main` prints as one line and turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import types
import typing
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from quiver.config import from_dict
from quiver.defaults import DEFAULT_MODEL
from quiver.errors import QuiverError

app = typer.Typer(help="Train, keep and reuse a library of LoRA experts.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
tasks_app = typer.Typer(help="List the tasks quiver can read.", no_args_is_help=True)
library_app = typer.Typer(help="Inspect and manage an expert library.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(library_app, name="library")
console = Console()
PIPED_WIDTH = 400  # columns of output that is no terminal: wide tables keep their names whole


def fit_console(out: Console) -> Console:
    """Give output that is no terminal (a log file, CI) `PIPED_WIDTH` columns unless COLUMNS
    sets them: rich would fall back to 80 (or the width of a terminal on another stream) and
    cut the expert and task names of a wide table, such as `quiver build`'s, to a few
    characters. Tables are as wide as their contents, so nothing else changes."""
    if not out.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        out.width = PIPED_WIDTH
    return out


@app.callback()
def _global_options(
    bigbench_dir: Path = typer.Option(
        None, "--bigbench-dir", help="BIG-bench's bigbench/ folder, for bigbench: tasks (sets "
        "$QUIVER_BIGBENCH_DIR for this command and the workers it starts)"),
) -> None:
    """Train, keep and reuse a library of LoRA experts."""
    if bigbench_dir is not None:
        os.environ["QUIVER_BIGBENCH_DIR"] = str(bigbench_dir)


def main() -> None:
    """Console-script entry point: one clear line and exit code 2 for bad input."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations
    fit_console(console)
    try:
        app()
    except QuiverError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


def config_options(cls: type, param: str = "config"):
    """Add every field of config dataclass `cls` as a `--option`, and pass `param=cls(...)`.

    The options' names, defaults and help come from the dataclass, so the CLI and the Python
    API cannot drift apart. A command may take several configs (each under its own `param`),
    as long as their field names differ.
    """
    hints = typing.get_type_hints(cls)

    def decorate(func):
        signature = inspect.signature(func)
        params = [p for p in signature.parameters.values() if p.name != param]
        names = []
        for f in dataclasses.fields(cls):
            annotation, default = hints[f.name], f.default
            if typing.get_origin(annotation) is tuple:  # typer wants lists for repeated options
                annotation, default = list[str], list(default)
            if isinstance(annotation, types.UnionType):  # e.g. `int | str`: the config parses
                annotation = str
            if default is dataclasses.MISSING:  # a field without default: a required option
                default = ...
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))  # e.g. --from
            option = typer.Option(default, flag, help=f.metadata.get("help", ""))
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=option, annotation=annotation))
            names.append(f.name)

        @functools.wraps(func)
        def wrapper(**kwargs):
            values = {n: kwargs.pop(n) for n in names}
            return func(**{param: from_dict(cls, values)}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)
        del wrapper.__wrapped__  # typer must see the new signature, not func's
        return wrapper

    return decorate


# --------------------------------------------------------------------------- train
from quiver.training.config import TrainConfig  # noqa: E402  (after app, to keep the CLI at the top)


@app.command()
@config_options(TrainConfig)
def train(
    task: list[str] = typer.Option(..., "--task", help="task name; repeat for a multi-task expert"),
    library: str = typer.Option(..., "--library", help="library folder or fsspec URL"),
    name: str = typer.Option(..., "--name", help="name of the new expert"),
    base: str = typer.Option(None, "--base", help="base model name, folder or HF id "
                             "(default: the library's, else SmolLM2-135M-Instruct)"),
    dtype: str = typer.Option("auto", help="base weights: auto (GPU bf16, CPU fp32), fp32, bf16"),
    overwrite: bool = typer.Option(False, help="replace an existing expert of that name"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    config: TrainConfig = None,
) -> None:
    """Train one LoRA expert on one or more tasks and add it to a library."""
    from quiver.build import train_into_library

    expert, result = train_into_library(task, library, name, library_base(library, base),
                                        config, overwrite, not quiet, dtype=dtype)
    console.print(
        f"added [bold]{expert.name}[/] to {library}: {result.steps} steps, "
        f"{result.tokens_per_second:,.0f} tokens/s, best valid loss "
        f"{result.best_valid_loss:.4f} at step {result.best_step}"
    )


# --------------------------------------------------------------------------- build
from quiver.adapters.config import MTLLoRAConfig, PolyMHRConfig  # noqa: E402
from quiver.build_config import BuildConfig  # noqa: E402


@app.command("build")
@config_options(TrainConfig)
@config_options(BuildConfig, param="build_config")
@config_options(PolyMHRConfig, param="poly_config")
@config_options(MTLLoRAConfig, param="mtl_config")
def build_command(
    tasks_file: Path = typer.Option(..., help="file with one task name per line"),
    library: str = typer.Option(..., help="the library to build (folder or fsspec URL)"),
    private: str = typer.Option(None, help="mbc, random: the private library to cluster; "
                                           "experts it lacks are trained into it first"),
    base: str = typer.Option(None, help="base model name, folder or HF id (default: the "
                                        "library's, else SmolLM2-135M-Instruct)"),
    dtype: str = typer.Option("auto", help="base weights: auto (GPU bf16, CPU fp32), fp32, bf16"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    config: TrainConfig = None,
    build_config: BuildConfig = None,
    poly_config: PolyMHRConfig = None,
    mtl_config: MTLLoRAConfig = None,
) -> None:
    """Build a library: an expert per task, one shared, one per (MBC or random) cluster, or
    one Poly / MHR / MTL-LoRA entry trained on every task (a row per task).

    Experts already in the library are skipped and interrupted trainings resume, so running
    the same command again finishes a build. Exits with 1 if any training failed.
    """
    from quiver.adapters import adapter_for_strategy
    from quiver.build import build_library
    from quiver.recipes import read_tasks_file
    from quiver.report import build_table

    adapter = adapter_for_strategy(build_config.strategy, [poly_config, mtl_config])
    report = build_library(read_tasks_file(tasks_file), library, library_base(library, base),
                           config, build_config,
                           private, dtype, not quiet, adapter)
    if report.private:
        console.print(build_table(report.private, f"private experts in {private}"))
    if report.outcomes:
        console.print(build_table(report.outcomes, f"{report.strategy} library {library}"))
    if report.failed:
        names = ", ".join(o.name for o in report.failed)
        Console(stderr=True).print(f"[bold red]error:[/] {len(report.failed)} training(s) "
                                   f"failed: {names}", highlight=False)
        raise typer.Exit(1)


# --------------------------------------------------------------------------- tasks
@tasks_app.command("ls")
def tasks_ls(
    kind: str = typer.Option(None, help="mc (multiple choice) or gen (generative)"),
    min_examples: int = typer.Option(0, help="only tasks with at least this many examples"),
    source: str = typer.Option("gym", help="'gym' (reasoning-gym), 'bigbench' (where its "
                               "files are) or a Flan-layout dataset hf:PATH"),
    contains: str = typer.Option(None, help="only names containing this text, or this family"),
) -> None:
    """List available tasks with their family, kind and number of examples."""
    from quiver.recipes import available_tasks

    rows = available_tasks(source, kind, min_examples, contains)
    table = Table("task", "family", "kind", "examples", "description",
                  title=f"{len(rows)} tasks")
    for row in rows:
        table.add_row(row.name, row.family or "-", row.kind, str(row.examples), row.description)
    console.print(table)
    if source == "gym":
        console.print("gym tasks take their generator's knobs in the name, e.g. "
                      "gym:basic_arithmetic?max_digits=2&size=500 (`quiver tasks show NAME` "
                      "lists them)", highlight=False)


@tasks_app.command("show")
def tasks_show(name: str = typer.Argument(..., help="a task name, e.g. gym:chain_sum")) -> None:
    """One task: its family, knobs (gym), split sizes and a first training example."""
    from quiver.recipes import describe_task

    console.print_json(data=describe_task(name))


# --------------------------------------------------------------------------- adapt
from quiver.adaptation.config import AdaptConfig  # noqa: E402


@app.command()
@config_options(TrainConfig)
@config_options(AdaptConfig, param="adapt_config")
def adapt(
    task: str = typer.Option(..., "--task", help="the new task"),
    library: str = typer.Option(..., "--library", help="library the result is added to"),
    name: str = typer.Option(..., "--name", help="name of the new entry"),
    base: str = typer.Option(None, "--base", help="base model name, folder or HF id "
                             "(default: the library's, else SmolLM2-135M-Instruct)"),
    dtype: str = typer.Option("auto", help="base weights: auto (GPU bf16, CPU fp32), fp32, bf16"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    config: TrainConfig = None,
    adapt_config: AdaptConfig = None,
) -> None:
    """Adapt to a new task from a few of its examples (--shots) with a method that starts
    from nothing, a Poly/MHR entry or a library of LoRA experts (--from), and add the result
    to the library. --shots replaces --max-train; mhr-mu and lib-mu take --rank and
    --target-modules from their source; lorahub searches instead of training."""
    from quiver.adaptation import adapt_task

    expert = adapt_task(task, library, name, adapt_config, config, library_base(library, base),
                        dtype, not quiet)
    loss = expert.info.metrics.get("best_valid_loss", expert.info.metrics.get("lorahub_loss"))
    console.print(f"added [bold]{expert.name}[/] to {library}: {adapt_config.method} on "
                  f"{adapt_config.shots} examples of {expert.info.tasks[0]}, a "
                  f"{expert.info.kind} entry (loss {loss:.4f})")


# ------------------------------------------------------------------------- library
@library_app.command("ls")
def library_ls(url: str = typer.Argument(..., help="library folder or fsspec URL")) -> None:
    """List the experts of a library (reads metadata only)."""
    from quiver.library import Library
    from quiver.report import library_table

    console.print(library_table(Library(url)))


@library_app.command("show")
def library_show(url: str, name: str) -> None:
    """Show one expert's metadata."""
    from quiver.library import Library

    expert = Library(url).get(name)
    console.print_json(data={"info": expert.info.__dict__, "adapter_config": expert.adapter_config})


@library_app.command("import-peft")
def library_import_peft(
    url: str,
    path: str,
    name: str = typer.Option(..., "--name"),
    task: list[str] = typer.Option([], "--task", help="task(s) the adapter was trained on"),
    base: str = typer.Option(None, "--base", help="base model, if the library is still empty"),
) -> None:
    """Add a PEFT LoRA adapter folder to a library."""
    from quiver.library import Library

    expert = Library(url, create=True).import_peft(path, name, tasks=task, base_model=base)
    console.print(f"imported [bold]{expert.name}[/] into {url}")


@library_app.command("export-peft")
def library_export_peft(
    url: str,
    name: str,
    out: Path,
    task: str = typer.Option(None, "--task", help="an mtl-lora entry: the task to export, "
                                                  "as a plain LoRA"),
) -> None:
    """Write an expert as a PEFT adapter folder (loadable by PeftModel.from_pretrained)."""
    from quiver.library import Library
    from quiver.recipes import export_task

    if task is None:
        Library(url).export_peft(name, str(out))
    else:
        export_task(url, name, task, out=str(out))
    console.print(f"exported [bold]{name}[/]{f' (task {task})' if task else ''} to {out}")


@library_app.command("export-task")
def library_export_task(
    url: str,
    entry: str = typer.Argument(..., help="the mtl-lora entry"),
    task: str = typer.Argument(..., help="one of its training tasks"),
    name: str = typer.Option(..., "--name", help="name of the new LoRA expert"),
) -> None:
    """Add one task of an MTL-LoRA entry to the library as a plain LoRA expert (A, B_t L_t):
    the same outputs on that task, usable by merges, routing and PEFT."""
    from quiver.recipes import export_task

    expert = export_task(url, entry, task, name=name)
    console.print(f"added [bold]{expert.name}[/] to {url}: task {expert.info.tasks[0]} of "
                  f"[bold]{entry}[/] as a rank-{expert.info.lora['r']} LoRA")


@library_app.command("rm")
def library_rm(url: str, name: str) -> None:
    """Remove an expert."""
    from quiver.library import Library

    Library(url).remove(name)
    console.print(f"removed [bold]{name}[/] from {url}")


@library_app.command("rename")
def library_rename(url: str, old: str, new: str) -> None:
    """Rename an expert."""
    from quiver.library import Library

    Library(url).rename(old, new)
    console.print(f"renamed [bold]{old}[/] to [bold]{new}[/]")


# ---------------------------------------------------------------------------- eval
from quiver.evaluation.config import EvalConfig  # noqa: E402


@app.command("eval")
@config_options(EvalConfig)
def eval_command(
    method: str = typer.Option(..., help="base, arrow, spectr, uniform, centroid, phatgoose, "
                                         "oracle, or expert:NAME (a Poly/MHR or MTL-LoRA entry: "
                                         "each task with its own row)"),
    task: list[str] = typer.Option([], "--task", help="task to evaluate; repeatable"),
    tasks_file: Path = typer.Option(None, help="file with one task name per line"),
    library: str = typer.Option(None, help="library folder or fsspec URL"),
    base: str = typer.Option(None, help="base model (default: the library's, else "
                                        "SmolLM2-135M-Instruct)"),
    dtype: str = typer.Option("auto", help="base weights: auto (bf16 on GPU, fp32 on CPU), "
                                           "fp32 or bf16 (faster on CPUs with bf16 units)"),
    top_k: int = typer.Option(None, help="experts per token (default: the method's own)"),
    temperature: float = typer.Option(1.0, help="routing temperature"),
    allow_seen: bool = typer.Option(False, help="allow tasks the experts were trained on"),
    out: Path = typer.Option(None, help="write the report as JSON here"),
    routing_plot: Path = typer.Option(None, help="save a heatmap of the routing choices here"),
    gate_steps: int = typer.Option(100, help="PHATGOOSE: gate training steps per expert"),
    general: list[str] = typer.Option([], "--general", help="Arrow: general experts whose "
                                      "mean update is subtracted first (GenKnowSub)"),
    config: EvalConfig = None,
) -> None:
    """Evaluate a method on held-out tasks and print the per-task table."""
    from quiver.recipes import evaluate_method
    from quiver.report import eval_table, write_report

    names = _task_names(task, tasks_file)
    report = evaluate_method(method, names, library, library_base(library, base), config,
                             allow_seen, top_k,
                             temperature, routing_plot=routing_plot, gate_steps=gate_steps,
                             general=general or None, dtype=dtype)
    console.print(eval_table(report))
    if out:
        write_report(report, out)
        console.print(f"report written to {out}")
    if routing_plot:
        console.print(f"routing heatmap saved to {routing_plot}")


# --------------------------------------------------------------------------- merge
@app.command()
def merge(
    library: str = typer.Argument(..., help="library folder or fsspec URL"),
    method: str = typer.Option(..., help="uniform, uniform-delta, ties or task-arithmetic"),
    name: str = typer.Option(..., help="name of the merged expert"),
    experts: list[str] = typer.Option(None, "--experts", help="experts to merge (default all)"),
    lam: float = typer.Option(1.0, "--lambda", help="scale of TIES and task arithmetic"),
    density: float = typer.Option(0.2, help="fraction of entries TIES keeps"),
    rank: int = typer.Option(None, help="rank of the stored merge (default: exact / sum)"),
) -> None:
    """Merge experts into a new expert of the library (exportable to PEFT)."""
    from quiver.library import Library
    from quiver.merging import merge_experts

    lib = Library(library)
    chosen = lib.experts(experts or None)
    merged, report = merge_experts(chosen, method, name, rank, lam, density)
    lib.add(merged)
    console.print(f"added [bold]{name}[/] ({method} of {len(chosen)} experts), rank "
                  f"{report['rank']}, max relative truncation error "
                  f"{report['max_relative_error']:.2e}")


# ------------------------------------------------------------------------- cluster
from quiver.transforms.config import MBCConfig  # noqa: E402


@app.command()
@config_options(MBCConfig)
def cluster(
    library: str = typer.Argument(..., help="library folder or fsspec URL"),
    out: Path = typer.Option(None, help="write the clusters as JSON here: each cluster's "
                                        "name and the names of its experts"),
    plot: Path = typer.Option(None, help="save the similarity heatmap, ordered by cluster"),
    silhouette_out: Path = typer.Option(None, "--silhouette-plot", help="with --k auto: save "
                                        "the silhouette score of every k tried"),
    experts: list[str] = typer.Option(None, "--experts", help="experts to cluster (default "
                                                              "all)"),
    save_as: str = typer.Option(None, help="also store the clustering in the library"),
    config: MBCConfig = None,
) -> None:
    """Cluster experts by the similarity of their LoRA weights (MBC) and print the clusters."""
    from quiver.recipes import cluster_library
    from quiver.report import (
        cluster_heatmap,
        clusters_table,
        silhouette_plot,
        write_report,
    )

    if silhouette_out and config.k != "auto":
        raise QuiverError("--silhouette-plot needs --k auto (a single k has no curve)")
    clustering, tasks = cluster_library(library, config, experts or None, save_as)
    console.print(clusters_table(clustering, tasks))
    sizes = sorted((len(m) for m in clustering.clusters.values()), reverse=True)
    console.print(f"{len(sizes)} clusters of {clustering.config.space} similarity; sizes "
                  f"{', '.join(map(str, sizes))}")
    warning = clustering.degenerate()
    if warning:
        console.print(f"[bold yellow]warning:[/] {warning}")
    if config.k == "auto":
        scores = ", ".join(f"{k}: {v:.3f}" for k, v in clustering.silhouette.items())
        console.print(f"silhouette by k: {scores}; chose k={clustering.k}")
    if out:
        write_report(clustering.clusters, out)
        console.print(f"clusters written to {out}")
    if plot:
        cluster_heatmap(clustering, tasks, plot)
        console.print(f"similarity heatmap saved to {plot}")
    if silhouette_out:
        silhouette_plot(clustering.silhouette, clustering.k, silhouette_out)
        console.print(f"silhouette curve saved to {silhouette_out}")
    if save_as:
        console.print(f"clustering stored in {library} as [bold]{save_as}[/]")


# ------------------------------------------------------------------------ transfer
from quiver.evaluation.config import TransferConfig  # noqa: E402


@app.command()
@config_options(TransferConfig)
def transfer(
    library: str = typer.Argument(..., help="library folder or fsspec URL"),
    task: list[str] = typer.Option([], "--task", help="task to score on; repeatable"),
    tasks_file: Path = typer.Option(None, help="file with one task name per line"),
    experts: list[str] = typer.Option(None, "--experts", help="experts (default all)"),
    base: str = typer.Option(None, help="base model (default: the library's, else "
                                        "SmolLM2-135M-Instruct)"),
    out: Path = typer.Option(None, help="write the matrix as JSON here"),
    plot: Path = typer.Option(None, help="save the matrix as a heatmap here"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    config: TransferConfig = None,
) -> None:
    """Score every expert (and the base model) on every task: the transfer matrix."""
    from quiver.recipes import transfer_report
    from quiver.report import transfer_heatmap, transfer_table, write_report

    names = _task_names(task, tasks_file)
    report = transfer_report(library, names, library_base(library, base), config,
                             experts or None, not quiet)
    console.print(transfer_table(report))
    if out:
        write_report(report, out)
        console.print(f"transfer matrix written to {out}")
    if plot:
        transfer_heatmap(report, plot)
        console.print(f"transfer heatmap saved to {plot}")


def library_base(library: str | None, base: str | None) -> str:
    """`--base`, else the library's base model, else SmolLM2 (`models.library_base`)."""
    from quiver.models import library_base as resolve

    return resolve(library, base)


def _task_names(task: list[str], tasks_file: Path | None) -> list[str]:
    """The tasks named by `--task` options and a `--tasks-file`, in that order."""
    from quiver.recipes import read_tasks_file

    names = list(task) + (read_tasks_file(tasks_file) if tasks_file else [])
    if not names:
        raise QuiverError("no tasks: pass --task or --tasks-file")
    return names


# ------------------------------------------------------------------------- lm-eval
@app.command("lm-eval-tasks")
def lm_eval_tasks(
    folder: Path = typer.Argument(..., help="where to write them: lm-eval's --include_path"),
    task: list[str] = typer.Option([], "--task", help="a task; repeatable "
                                   "(default: six reasoning-gym tasks with closed answer "
                                   "sets, mc=true)"),
    tasks_file: Path = typer.Option(None, help="file with one task name per line"),
    limit: int = typer.Option(0, help="examples per task, at most (0: all): the first of "
                                      "quiver's seeded order, as quiver eval --split all"),
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="the model whose tokenizer sets "
                             "generative tasks' generation budget, as quiver eval's"),
) -> None:
    """Write tasks as lm-evaluation-harness task configs (YAML + JSONL) that run offline, with
    quiver eval's prompts and examples: multiple-choice tasks, and gym tasks generated and
    scored by their own scorer."""
    from quiver.evaluation.lm_eval_tasks import GROUP, write_task_configs
    from quiver.models import load_tokenizer

    names = _task_names(task, tasks_file) if task or tasks_file else None
    written = write_task_configs(folder, names, limit, tokenizer=load_tokenizer(base))
    table = Table("lm-eval task", "quiver task", "examples",
                  title=f"{len(written)} lm-eval tasks in {folder} (group {GROUP})")
    for w in written:
        table.add_row(w.name, w.quiver_name, str(w.examples))
    console.print(table)
    console.print(f"run them: quiver lm-eval --model quiver --model_args library=LIB,"
                  f"method=arrow --include_path {folder} --tasks {GROUP}", highlight=False)


@app.command("lm-eval", add_help_option=False, context_settings={
    "allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_command(ctx: typer.Context) -> None:
    """lm-evaluation-harness's command line with the `quiver` model registered (the same
    as `python -m quiver.lm_eval_bridge`): lm-eval --model quiver --model_args
    library=LIB,method=arrow,top_k=4 --tasks ...; needs pip install 'quiver[lm-eval]'."""
    from quiver.lm_eval_bridge import main as lm_eval_main

    lm_eval_main(ctx.args)


# ---------------------------------------------------------------------------- demo
@app.command()
def demo(
    library: str = typer.Option("demo-library", help="where to put the demo's library"),
    steps: int = typer.Option(16, help="training steps per private expert (MBC: twice)"),
    fresh: bool = typer.Option(False, help="retrain experts that already exist"),
) -> None:
    """The whole story on SmolLM2: private library, MBC clusters, zero-shot comparison."""
    from quiver.demo import run_demo

    run_demo(library, steps, fresh, console)


# ------------------------------------------------------------------- generate, serve
@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the prompt (with --chat: the user's message)"),
    library: str = typer.Option(None, help="library folder or fsspec URL"),
    method: str = typer.Option(None, help="base, arrow or uniform (default: arrow with a "
                                          "library, else base)"),
    expert: str = typer.Option(None, help="one expert of the library (a merge is one too)"),
    base: str = typer.Option(None, help="base model (default: the library's)"),
    dtype: str = typer.Option("auto", help="base weights: auto (GPU bf16, CPU fp32), fp32, bf16"),
    chat: bool = typer.Option(False, help="wrap the prompt in the tokenizer's chat template"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0 is greedy; higher samples more freely"),
    top_p: float = typer.Option(1.0, help="nucleus sampling: keep this much probability"),
    seed: int = typer.Option(None, help="seed of the sampling"),
    top_k: int = typer.Option(4, help="Arrow: experts per token"),
) -> None:
    """Print the completion of a prompt by a library (Arrow or uniform routing), one of its
    experts, or the bare base model."""
    from quiver.serving.generate import generate_text, load_served, model_name
    from quiver.serving.sampling import SamplingParams

    if expert and method:
        raise QuiverError("pass --method or --expert, not both")
    if (expert or method not in (None, "base")) and not library:
        raise QuiverError(f"{'--expert' if expert else method!r} needs a library (--library)")
    sampling = SamplingParams(max_new_tokens, temperature, top_p, seed)
    served = load_served(library, base, dtype, top_k)
    name = model_name(method or ("arrow" if library else "base"), expert)
    print(generate_text(served, prompt, name, sampling, chat))


from quiver.serving.config import ServeConfig  # noqa: E402


@app.command("serve")
@config_options(ServeConfig)
def serve_command(
    library: str = typer.Option(None, help="library folder or fsspec URL (without one: the "
                                           "bare base model only)"),
    base: str = typer.Option(None, help="base model (default: the library's)"),
    dtype: str = typer.Option("auto", help="base weights: auto (GPU bf16, CPU fp32), fp32, bf16"),
    api_key: str = typer.Option(None, "--api-key", envvar="QUIVER_API_KEY",
                                help="require this key (Authorization: Bearer KEY); prefer "
                                     "the QUIVER_API_KEY variable, which `ps` does not show"),
    config: ServeConfig = None,
) -> None:
    """Serve a library over OpenAI's HTTP API: /v1/models, /v1/completions,
    /v1/chat/completions (streamed or not) and /health; each request names base, arrow,
    uniform or expert:NAME as its model, and requests naming different ones are batched."""
    from quiver.serving.generate import load_served
    from quiver.serving.server import serve

    served = load_served(library, base, dtype, config.top_k, config.arrow_temperature)
    Console(stderr=True).print(f"serving {', '.join(served.routes)} on "
                               f"http://{config.host}:{config.port}/v1"
                               f"{' (API key required)' if api_key else ''}", highlight=False,
                               soft_wrap=True)
    serve(served, config, api_key or None)


if __name__ == "__main__":
    main()
