"""Tables and plots that show results to a person (plots: matplotlib, Agg backend)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from quiver.library import Library

if TYPE_CHECKING:
    from quiver.build import JobOutcome


def library_table(library: Library) -> Table:
    """One row per expert: its kind, tasks, rank, training steps, best validation loss,
    creation time."""
    names = library.names()
    base = library.base
    title = f"{library.url}: {len(names)} experts" + (f" for {base['name']}" if base else "")
    table = Table("expert", "kind", "tasks", "rank", "steps", "valid loss", "source", "created",
                  title=title)
    for name in names:
        info = library.get(name).info
        tasks = ", ".join(t.removeprefix("bigbench:") for t in info.tasks) or "-"
        loss = info.metrics.get("best_valid_loss")
        table.add_row(
            name,
            _kind(info),
            tasks if len(tasks) < 60 else tasks[:57] + "...",
            str(info.lora.get("r")),
            str(info.training.get("steps_run", "-")),
            f"{loss:.3f}" if isinstance(loss, float) else "-",
            info.source,
            info.created,
        )
    return table


def _kind(info) -> str:
    """`lora`, a Poly/MHR entry with its skills S and heads H, or an MTL-LoRA entry with its
    up-projections n and mixing temperature tau."""
    if info.kind == "mtl-lora":
        return (f"mtl-lora (n={info.lora.get('up_projections')}, "
                f"tau={info.lora.get('mix_temperature')})")
    if info.kind != "poly":
        return info.kind
    skills, heads = info.lora.get("skills"), info.lora.get("heads", 1)
    return f"poly (S={skills})" if heads == 1 else f"mhr (S={skills}, H={heads})"


def build_table(outcomes: list[JobOutcome], title: str) -> Table:
    """One row per job of a build (`quiver.build.JobOutcome`): what it trained, or why not."""
    table = Table("expert", "tasks", "status", "steps", "valid loss", "seconds", "tries",
                  "error", title=title)
    for o in outcomes:
        tasks = ", ".join(t.removeprefix("bigbench:") for t in o.tasks) or "-"
        status = {"failed": "[red]failed[/]", "trained": "[green]trained[/]"}.get(o.status,
                                                                                 o.status)
        table.add_row(
            o.name,
            tasks if len(tasks) < 60 else tasks[:57] + "...",
            status,
            "-" if o.steps is None else str(o.steps),
            f"{o.best_valid_loss:.3f}" if isinstance(o.best_valid_loss, float) else "-",
            f"{o.seconds:.1f}" if o.status == "trained" else "-",
            str(o.attempts or "-"),
            o.error,
        )
    return table


def eval_table(report: dict) -> Table:
    """Per-task metrics and the average of an evaluation report."""
    metrics = [m for m in ("accuracy", "accuracy_norm", "accuracy_char_norm",
                           "accuracy_calibrated", "score", "exact_match", "rougeL",
                           "answer_loglik")
               if m in report["average"]]
    table = Table("task", "n", *metrics,
                  title=f"{report['method']} on {report['model']} ({report['settings']['split']})")
    for name, result in report["tasks"].items():
        cells = [_cell(result[m], m) if m in result else "" for m in metrics]
        table.add_row(name.removeprefix("bigbench:"), str(result["examples"]), *cells)
    table.add_section()
    table.add_row("average", "", *[_cell(report["average"][m], m) for m in metrics])
    return table


def _cell(value: float, metric: str) -> str:
    """Percentages to one decimal; log-likelihoods (nats per token) to three."""
    return f"{value:.3f}" if metric == "answer_loglik" else f"{value:.1f}"


def write_report(report: dict, path: Path) -> None:
    """Write a JSON report atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staging.write_text(json.dumps(report, indent=1))
    staging.replace(path)


METRIC_TITLES = {"answer_loglik": "answer log-likelihood (nats per token, higher is better)",
                 "score": "score (%, the task's own scorer)"}


def comparison_table(reports: list[dict], metric: str) -> Table:
    """One row per task, one column per method: `metric` of each (and the average)."""
    table = Table("task", *[r.get("label", r["method"]) for r in reports],
                  title=METRIC_TITLES.get(metric, f"{metric} (%)"))
    for task in reports[0]["tasks"]:
        table.add_row(task.removeprefix("bigbench:"),
                      *[_cell(r["tasks"][task].get(metric, float("nan")), metric)
                        for r in reports])
    table.add_section()
    table.add_row("average", *[_cell(r["average"].get(metric, float("nan")), metric)
                               for r in reports])
    return table


def routing_heatmap(counts: dict, expert_names: list[str], path: Path, title: str) -> None:
    """Save a heatmap: rows are layers, columns experts, colour the share of tokens routed."""
    import numpy as np

    plt = _pyplot()
    layers = list(counts)
    shares = np.stack([counts[name].double().numpy() for name in layers])
    shares = shares / np.maximum(shares.sum(1, keepdims=True), 1)
    height = min(40, 2 + 0.12 * len(layers))
    figure, axis = plt.subplots(figsize=(2 + 0.35 * len(expert_names), height))
    image = axis.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_xticks(range(len(expert_names)), expert_names, rotation=90, fontsize=7)
    axis.set_yticks(range(len(layers)), [n.removeprefix("model.") for n in layers], fontsize=5)
    axis.set_xlabel("expert")
    axis.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axis, label="share of routing choices")
    _save_figure(figure, path)


# ------------------------------------------------------------------------ clustering
def task_labels(tasks: dict[str, list[str]]) -> dict[str, str]:
    """A short label per expert: its tasks, shortened (else its name)."""
    return {name: ", ".join(_short_task(t) for t in names) or name
            for name, names in tasks.items()}


def clusters_table(clustering, tasks: dict[str, list[str]]) -> Table:
    """One row per cluster: its size, experts and their tasks."""
    labels = task_labels(tasks)
    score = clustering.silhouette.get(clustering.k)
    title = (f"{len(clustering.clusters)} clusters of {len(clustering.names)} experts "
             f"(k={clustering.k}" + (f", silhouette {score:.3f})" if score is not None else ")"))
    table = Table("cluster", "size", "experts", "tasks", title=title)
    for cluster, members in clustering.clusters.items():
        table.add_row(cluster, str(len(members)), ", ".join(members),
                      "; ".join(labels.get(m, m) for m in members))
    return table


def cluster_heatmap(clustering, tasks: dict[str, list[str]] | None, path: Path,
                    families: dict[str, str] | None = None) -> None:
    """Save the experts' cosine-similarity matrix with cluster borders.

    Args:
        clustering: a `quiver.transforms.mbc.Clustering`.
        tasks: each expert's tasks, which label the axes (default: the experts' names).
        families: each expert's family (e.g. reasoning-gym's category): the experts are then
            ordered by family, the borders are the families' and each label names its
            cluster, so clusters that follow the families show as blocks on the diagonal.
            Default: ordered by cluster, the borders the clusters'.
    """
    import numpy as np

    plt = _pyplot()
    by_name = task_labels(tasks or {})
    labels = [by_name.get(name, name) for name in clustering.names]
    position = {name: i for i, name in enumerate(clustering.names)}
    if families:
        cluster_of = {m: c for c, members in clustering.clusters.items() for m in members}
        groups: dict[str, list[str]] = {}
        for name in sorted(clustering.names, key=lambda n: (families.get(n, ""), cluster_of[n])):
            groups.setdefault(families.get(name) or "-", []).append(name)
        labels = [f"{families.get(n) or '-'} | {cluster_of[n]} | {label}"
                  for n, label in zip(clustering.names, labels, strict=True)]
    else:
        groups = clustering.clusters
    order = [position[m] for members in groups.values() for m in members]
    matrix = clustering.similarity[np.ix_(order, order)]  # (E, E), grouped
    size = min(30, max(4.0, 2 + 0.25 * len(order)))
    label_width = min(8.0, 0.06 * max(len(label) for label in labels))  # inches, at 7 pt
    figure, axis = plt.subplots(figsize=(size + label_width + 1.5, size + 0.5))
    off_diagonal = matrix[~np.eye(len(order), dtype=bool)]
    low, high = (off_diagonal.min(), off_diagonal.max()) if off_diagonal.size else (-1, 1)
    image = axis.imshow(matrix, cmap="viridis", vmin=low, vmax=max(high, low + 1e-6),
                        interpolation="nearest")
    font = 7 if len(order) <= 40 else 4
    # rows carry the labels, numbered; columns only the numbers (long labels twice would
    # squeeze the matrix)
    axis.set_xticks(range(len(order)), [str(j) for j in range(len(order))], fontsize=font)
    axis.set_yticks(range(len(order)), [f"{labels[i]}  {j}" for j, i in enumerate(order)],
                    fontsize=font)
    edge = -0.5
    for members in list(groups.values())[:-1]:
        edge += len(members)
        axis.axhline(edge, color="black", linewidth=1.2)
        axis.axvline(edge, color="black", linewidth=1.2)
    borders = "families (labels: family | cluster | tasks)" if families else "clusters"
    axis.set_title(f"MBC: {len(clustering.clusters)} clusters of {len(order)} experts "
                   f"(k={clustering.k}); borders: {borders}", fontsize=9)
    figure.colorbar(image, ax=axis, label="cosine similarity of the expert embeddings",
                    shrink=0.8)
    _save_figure(figure, path)


def silhouette_plot(silhouette: dict[int, float], chosen: int, path: Path) -> None:
    """Save the silhouette score against k, the chosen k marked."""
    plt = _pyplot()
    ks = sorted(silhouette)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(ks, [silhouette[k] for k in ks], marker="o")
    if chosen in silhouette:
        axis.scatter([chosen], [silhouette[chosen]], s=120, facecolors="none",
                     edgecolors="red", linewidths=2, zorder=3, label=f"chosen k={chosen}")
        axis.legend(fontsize=8)
    axis.set_xticks(ks)
    axis.set_xlabel("k (clusters)")
    axis.set_ylabel("silhouette score (cosine)")
    axis.set_title("choosing k", fontsize=9)
    axis.grid(alpha=0.3)
    _save_figure(figure, path)


# ---------------------------------------------------------------------- transfer matrix
def transfer_table(report: dict) -> Table:
    """Rows: the base model and each expert; columns: tasks; cells: the report's metric."""
    metric = report["metric"]
    table = Table("expert", *[_short_task(t) for t in report["tasks"]],
                  title=f"transfer matrix: {metric} on the {report['split']} split "
                        f"({'lower' if metric == 'loss' else 'higher'} is better)")
    style = "{:.3f}" if metric == "loss" else "{:.1f}"
    for row, values in report["values"].items():
        own = set(report["expert_tasks"].get(row, []))
        cells = [("[bold]" if task in own else "") + style.format(values[task])
                 for task in report["tasks"]]
        table.add_row(row, *cells)
    return table


def transfer_heatmap(report: dict, path: Path) -> None:
    """Save the transfer matrix as a heatmap: rows experts (base first), columns tasks; an
    expert's own training tasks are outlined."""
    import numpy as np

    plt = _pyplot()
    rows, tasks = list(report["values"]), report["tasks"]
    matrix = np.array([[report["values"][r][t] for t in tasks] for r in rows])  # (rows, tasks)
    loss = report["metric"] == "loss"
    figure, axis = plt.subplots(figsize=(min(30, 4 + 0.6 * len(tasks)),
                                         min(30, 3 + 0.4 * len(rows))))
    image = axis.imshow(matrix, aspect="auto", interpolation="nearest",
                        cmap="viridis_r" if loss else "viridis")
    axis.set_xticks(range(len(tasks)), [_short_task(t) for t in tasks], rotation=90,
                    fontsize=7)
    axis.set_yticks(range(len(rows)), rows, fontsize=7)
    if matrix.size <= 400:  # numbers stay legible only on small matrices
        for (i, j), value in np.ndenumerate(matrix):
            red, green, blue, _ = image.cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            axis.text(j, i, f"{value:.2f}" if loss else f"{value:.0f}", ha="center",
                      va="center", fontsize=6, color="white" if dark else "black")
    for i, row in enumerate(rows):
        for j, task in enumerate(tasks):
            if task in report["expert_tasks"].get(row, []):
                axis.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                             edgecolor="red", linewidth=1.5))
    axis.set_xlabel("task")
    axis.set_ylabel("expert")
    axis.set_title(f"transfer: {report['metric']} on the {report['split']} split\n"
                   "(red: the expert's own tasks)", fontsize=9)
    figure.colorbar(image, ax=axis, label=report["metric"])
    _save_figure(figure, path)


def _short_task(name: str) -> str:
    """`bigbench:x` and `gym:x` -> `x`, `jsonl:/some/dir/x.jsonl` -> `jsonl:x.jsonl`."""
    if name.startswith("jsonl:"):
        return "jsonl:" + Path(name.removeprefix("jsonl:")).name
    return name.removeprefix("bigbench:").removeprefix("gym:")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and safe in worker processes
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
