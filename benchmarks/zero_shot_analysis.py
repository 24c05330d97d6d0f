"""Why routing wins or not: the analysis benchmarks/zero_shot.py adds when its budget has a
selection sample (`select`, the `large` budget). It reads reports and libraries only; it
does not import zero_shot (which imports it).

- Headroom: the oracle (for each held-out task, the private expert best on the selection
  sample, scored on the disjoint test examples) minus the uniform merge, paired. Near 0, no
  router can beat the merge on this library.
- Informative tasks, decided on the selection sample alone, before any method's test score:
  a task counts when the base model or some private expert scores above chance there by
  more than two binomial standard errors, acc > c + 2 sqrt(c (1 - c) / n), with c the mean of
  1 / options over the sample. Every average is given over all tasks and over these.
- Scoring rules side by side (raw log-likelihood, per token, per character as
  lm-evaluation-harness's acc_norm, content-free calibrated) and the share of predictions per
  option against the answers' share: does a method move the task's knowledge or only the
  prior over answers?
- The experts' separation on what they learned (cosine of their updates s B A) beside the
  cosine of their flattened parameters, and the MBC clusterings of both spaces: sizes,
  silhouette, degenerate or not, and the accuracy of their libraries.

Writes <stem>_analysis.{md,json}, <stem>_transfer.png and <stem>_mbc_spaces.png.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np

from benchmarks import stats
from benchmarks.common import provenance_line, write_json, write_text
from benchmarks.stats import interval


class Sizes(Protocol):
    """What the analysis reads of a zero-shot budget."""

    clusters: int  # MBC's k
    select: int  # selection examples per held-out task
    limit: int  # test examples per held-out task, after them


SCORING = (("accuracy", "raw"), ("accuracy_norm", "per token"),
           ("accuracy_char_norm", "per character (lm-eval acc_norm)"),
           ("accuracy_calibrated", "content-free calibrated"))


def informative_tasks(selection: dict) -> dict[str, dict]:
    """Per task: chance, the best selection accuracy (base or an expert), who reached it, the
    threshold and whether the task counts (module docstring)."""
    result = {}
    for task in selection["tasks"]:
        n, chance = selection["examples"][task], selection["chance"][task]
        threshold = 100 * (chance + 2 * math.sqrt(chance * (1 - chance) / n))
        best_row = max(selection["values"], key=lambda row: selection["values"][row][task])
        best = selection["values"][best_row][task]
        result[task] = {"chance": 100 * chance, "threshold": threshold, "best": best,
                        "best_row": best_row, "informative": best > threshold}
    return result


def paired(reports: dict[str, dict], first: str, second: str, tasks: list[str]) -> dict:
    """first minus second on `tasks`: mean and paired 95% bootstrap interval (points)."""
    first_hits, second_hits = (stats.per_example(reports[label]) for label in (first, second))
    return stats.paired({t: first_hits[t] for t in tasks}, {t: second_hits[t] for t in tasks},
                        scale=100)


def averages(reports: dict[str, dict], tasks: list[str]) -> dict[str, dict]:
    """Each method's mean accuracy over `tasks` with its bootstrap interval."""
    labels = list(reports)
    samples = stats.bootstrap_average([{t: stats.per_example(reports[label])[t] for t in tasks}
                                       for label in labels], scale=100)
    return {label: {"average": float(np.mean([reports[label]["tasks"][t]["accuracy"]
                                              for t in tasks])),
                    "ci": interval(samples[:, m])} for m, label in enumerate(labels)}


def scoring_rules(reports: dict[str, dict], tasks: list[str]) -> dict[str, dict]:
    """Each method's mean over `tasks` under each scoring rule it has."""
    return {label: {metric: float(np.mean([r["tasks"][t][metric] for t in tasks]))
                    for metric, _ in SCORING if metric in r["tasks"][tasks[0]]}
            for label, r in reports.items()}


def prior_shift(report: dict, task: str) -> float:
    """Total-variation distance (in points) between the shares of predicted and of correct
    options: 0 when a method predicts each option as often as it is right, 100 when it
    always predicts an option that is never the answer."""
    predicted, answers = report["tasks"][task]["prediction_share"], \
        report["tasks"][task]["answer_share"]
    labels = set(predicted) | set(answers)
    return 0.5 * sum(abs(predicted.get(x, 0) - answers.get(x, 0)) for x in labels)


def text_label_tasks(reports: dict[str, dict]) -> list[str]:
    """Tasks whose options are a small fixed set, counted by text (not by position)."""
    first = next(iter(reports.values()))
    return [t for t, r in first["tasks"].items()
            if r.get("answer_share") and not all(k.startswith("#") for k in r["answer_share"])]


def expert_separation(run: Path, names: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
    """Off-diagonal cosine ranges of the private experts' flattened parameters and of their
    updates, and both (E, E) matrices."""
    from quiver.library import Library
    from quiver.transforms.mbc import expert_vector, update_gram

    experts = Library(str(run / "private")).experts(names)
    vectors = np.stack([expert_vector(e) for e in experts]).astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    params = unit @ unit.T
    gram = update_gram(experts)
    norms = np.sqrt(np.diag(gram))
    update = gram / np.outer(norms, norms)
    off = ~np.eye(len(names), dtype=bool)
    summary = {label: {"min": float(m[off].min()), "median": float(np.median(m[off])),
                       "max": float(m[off].max())}
               for label, m in (("parameters", params), ("updates", update))}
    return summary, params, update


def mbc_clustering(run: Path, names: list[str], k: int, space: str):
    """MBC of the private experts in one space, as `quiver build --strategy mbc` computes it
    (seed 0)."""
    from quiver.library import Library
    from quiver.transforms.mbc import MBCConfig, cluster_experts

    return cluster_experts(Library(str(run / "private")).experts(names),
                           MBCConfig(k=k, space=space))


def write_analysis(stem: Path, run: Path, budget: Sizes, names: dict[str, list[str]],
                   reports: list[dict], selection: dict, record: dict,
                   test_transfer: dict | None = None) -> dict:
    """Compute everything of the module docstring, write the files (with `record`'s
    provenance), return the JSON. With `test_transfer` (the experts' transfer matrix on test
    examples), also how well the selection sample ranks the experts."""
    by_label = {r["label"]: r for r in reports}
    tasks = list(reports[0]["tasks"])
    rule = informative_tasks(selection)
    kept = [t for t in tasks if rule[t]["informative"]]
    subsets = {"all tasks": tasks, "informative tasks": kept} if kept else {"all tasks": tasks}
    result = {"informative": rule, "subsets": subsets, "averages": {}, "paired": {},
              "scoring": {}, "oracle": by_label["oracle"].get("per_task"), "spaces": {}}
    comparisons = [("oracle", "uniform merge"), ("oracle", "base"), ("oracle", "shared"),
                   ("Arrow MBC", "uniform merge"), ("Arrow MBC update", "uniform merge"),
                   ("Arrow private", "uniform merge"), ("Arrow MBC", "shared"),
                   ("Arrow private", "shared"), ("uniform merge", "base"), ("shared", "base")]
    comparisons = [(a, b) for a, b in comparisons if a in by_label and b in by_label]
    for name, subset in subsets.items():
        result["averages"][name] = averages(by_label, subset)
        result["paired"][name] = {f"{a} - {b}": paired(by_label, a, b, subset)
                                  for a, b in comparisons}
        result["scoring"][name] = scoring_rules(by_label, subset)
    result["headroom_per_task"] = {
        t: by_label["oracle"]["tasks"][t]["accuracy"] -
        by_label["uniform merge"]["tasks"][t]["accuracy"] for t in tasks}
    result["winners_curse"] = winners_curse(selection, by_label["oracle"], by_label["base"],
                                            tasks)
    result["reliability"] = (selection_reliability(selection, test_transfer, tasks)
                             if test_transfer else None)
    labelled = text_label_tasks(by_label)
    result["prior_shift"] = {label: {t: prior_shift(r, t) for t in labelled}
                             for label, r in by_label.items()}
    separation, params, update = expert_separation(run, names["private"])
    result["separation"] = separation
    for space in ("params", "update"):  # both spaces, whether or not their library was built
        clustering = mbc_clustering(run, names["private"], budget.clusters, space)
        label = "mbc" if space == "params" else f"mbc-{space}"
        arrow, uniform = (("Arrow MBC", "uniform MBC") if space == "params" else
                          (f"Arrow MBC {space}", f"uniform MBC {space}"))
        result["spaces"][space] = {
            "library": label if label in names else None,
            "sizes": sorted((len(m) for m in clustering.clusters.values()), reverse=True),
            "clusters": clustering.clusters,
            "silhouette": {str(k): v for k, v in clustering.silhouette.items()},
            "degenerate": clustering.degenerate(),
            "accuracy": {name: {m: result["averages"][name][m]["average"]
                                for m in (arrow, uniform) if m in by_label}
                         for name in subsets}}
    _transfer_plot(selection, rule, stem.with_name(stem.name + "_transfer.png"))
    _spaces_plot(names["private"], params, update, result["spaces"],
                 stem.with_name(stem.name + "_mbc_spaces.png"))
    result = {**record, **result}  # provenance first
    write_json(stem.with_name(stem.name + "_analysis.json"), result, indent=1)
    text = _markdown(result, by_label, tasks, labelled, selection, budget, stem.name)
    write_text(stem.with_name(stem.name + "_analysis.md"), text)
    print(text)
    return result


def winners_curse(selection: dict, oracle: dict, base: dict, tasks: list[str]) -> dict:
    """How much of the oracle's selection score was chance: each task's chosen expert on the
    selection sample against the same expert on the disjoint test examples. The base model's
    change between the two samples is the control (the samples may differ in difficulty)."""
    chosen = {t: selection["values"][oracle["per_task"][t]][t] for t in tasks}
    tested = {t: oracle["tasks"][t]["accuracy"] for t in tasks}
    select = min(selection["examples"].values())

    def mean(values) -> float:
        return float(np.mean(list(values)))

    return {"selection": chosen, "test": tested, "select": select,
            "candidates": sum(row != "base" for row in selection["values"]),
            "mean_selection": mean(chosen.values()), "mean_test": mean(tested.values()),
            "mean_drop": mean(tested[t] - chosen[t] for t in tasks),
            "base_selection": mean(selection["values"]["base"][t] for t in tasks),
            "base_test": mean(base["tasks"][t]["accuracy"] for t in tasks),
            "standard_error": 100 * math.sqrt(0.25 / select)}


def selection_reliability(selection: dict, test: dict, tasks: list[str]) -> dict:
    """Does the selection sample rank the experts as other examples do? Per task: the
    Spearman correlation, across the private experts, of their selection accuracy with their
    accuracy on the first test examples; the spread of the experts' test accuracies against
    one binomial standard error (if every expert had the same true accuracy and their errors
    were independent, the spread would be about one standard error; errors on shared
    examples make it smaller); and the best expert on those test examples against the base
    model there, an optimistic bound on what choosing one expert per task could buy."""
    from scipy.stats import spearmanr

    experts = [row for row in selection["values"] if row != "base"]
    per_task = {}
    for t in tasks:
        chosen = [selection["values"][e][t] for e in experts]
        tested = np.array([test["values"][e][t] for e in experts])
        n = test["examples"][t]
        p = float(np.clip(tested.mean() / 100, 0.01, 0.99))
        rho = spearmanr(chosen, tested).statistic if np.ptp(chosen) and np.ptp(tested) else None
        best = experts[int(np.argmax(tested))]
        per_task[t] = {"spearman": None if rho is None else float(rho), "examples": n,
                       "spread": float(tested.std(ddof=1)),
                       "standard_error": 100 * math.sqrt(p * (1 - p) / n),
                       "best": best, "best_test": float(tested.max()),
                       "base_test": float(test["values"]["base"][t]),
                       "mean_expert_test": float(tested.mean())}
    rhos = [v["spearman"] for v in per_task.values() if v["spearman"] is not None]
    return {"per_task": per_task, "mean_spearman": float(np.mean(rhos)) if rhos else None,
            "positive": sum(r > 0 for r in rhos), "with_ranking": len(rhos),
            "best_minus_base": float(np.mean([v["best_test"] - v["base_test"]
                                              for v in per_task.values()])),
            "mean_expert_minus_base": float(np.mean([v["mean_expert_test"] - v["base_test"]
                                                     for v in per_task.values()]))}


# ---------------------------------------------------------------------------------- output
def _short(task: str) -> str:
    return task.removeprefix("bigbench:")


def _reliability_markdown(reliability: dict, tasks: list[str]) -> list[str]:
    rows = reliability["per_task"]
    n = max(v["examples"] for v in rows.values())
    lines = ["", "## Does the selection sample rank the experts?", "",
             f"Every private expert also scored on the first {n} test examples (after the "
             "selection sample). Spearman: the rank correlation, across the experts, of "
             "selection accuracy with test accuracy (0: the selection sample's ranking says "
             "nothing about other examples). Spread: the standard deviation of the experts' "
             "test accuracies; with independent errors and one true accuracy it would be about "
             "one binomial standard error (SE). Best - base: the best expert on these test "
             "examples minus the base model on the same ones, an optimistic bound on picking "
             "one expert per task.", "",
             "| task | n | Spearman | spread | SE | best expert on test | best - base | "
             "mean expert - base |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for t in tasks:
        v = rows[t]
        rho = "n/a" if v["spearman"] is None else f"{v['spearman']:+.2f}"
        lines.append(f"| {_short(t)} | {v['examples']} | {rho} | {v['spread']:.1f} | "
                     f"{v['standard_error']:.1f} | {v['best']} | "
                     f"{v['best_test'] - v['base_test']:+.1f} | "
                     f"{v['mean_expert_test'] - v['base_test']:+.1f} |")
    mean = reliability["mean_spearman"]
    lines += ["", f"Mean Spearman over the {reliability['with_ranking']} tasks with a ranking: "
              f"{'n/a' if mean is None else f'{mean:+.2f}'} ({reliability['positive']} "
              f"positive); best expert - base {reliability['best_minus_base']:+.1f}, mean "
              f"expert - base {reliability['mean_expert_minus_base']:+.1f} points."]
    return lines


def _diff(d: dict) -> str:
    return f"{d['difference']:+.1f} ({d['ci'][0]:+.1f} to {d['ci'][1]:+.1f})"


def _markdown(result: dict, by_label: dict, tasks: list[str], labelled: list[str],
              selection: dict, budget: Sizes, stem: str) -> str:
    rule = result["informative"]
    lines = [f"# What routing can buy: headroom, scoring and MBC spaces (`{stem}`)", "",
             provenance_line(result), "",
             f"Selection sample: the first {budget.select} examples of each held-out "
             f"task's seeded `all` order; every method (and the oracle) is scored on up to "
             f"{budget.limit} examples after it. Intervals: paired 95% bootstrap.", "",
             "## Which tasks can say anything", "",
             "Rule, fixed before any method's test score: a task counts when the base model "
             "or some private expert beats chance on the selection sample by more than two "
             "binomial standard errors.", "",
             "| task | chance | threshold | best on selection | by | counts |",
             "|---|---:|---:|---:|---|---|"]
    for t in tasks:
        r = rule[t]
        lines.append(f"| {_short(t)} | {r['chance']:.1f} | {r['threshold']:.1f} | "
                     f"{r['best']:.1f} | {r['best_row']} | {'yes' if r['informative'] else 'no'} |")
    subsets = result["subsets"]
    lines += ["", "## Averages", "", "| method | " + " | ".join(
        f"{name} ({len(s)})" for name, s in subsets.items()) + " |",
        "|---|" + "---:|" * len(subsets)]
    for label in by_label:
        cells = [f"{result['averages'][n][label]['average']:.1f} "
                 f"({result['averages'][n][label]['ci'][0]:.1f} to "
                 f"{result['averages'][n][label]['ci'][1]:.1f})" for n in subsets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences:", "", "| difference | " + " | ".join(subsets) + " |",
              "|---|" + "---:|" * len(subsets)]
    for key in result["paired"]["all tasks"]:
        lines.append(f"| {key} | " + " | ".join(_diff(result["paired"][n][key])
                                               for n in subsets) + " |")
    curse = result["winners_curse"]
    lines += ["", "## Headroom per task (oracle minus uniform merge, test examples)", "",
              "The oracle's expert is the best of the private experts on the selection sample; "
              "'on selection' is that best score, 'on test' the same expert on the test "
              "examples. A drop from one to the other is the winner's curse: a maximum over "
              f"{curse['candidates']} experts scored on {curse['select']} examples is high by "
              "chance.", "",
              "| task | oracle's expert | on selection | on test | uniform merge | headroom |",
              "|---|---|---:|---:|---:|---:|"]
    for t in tasks:
        lines.append(f"| {_short(t)} | {(result['oracle'] or {}).get(t, '')} | "
                     f"{curse['selection'][t]:.1f} | "
                     f"{by_label['oracle']['tasks'][t]['accuracy']:.1f} | "
                     f"{by_label['uniform merge']['tasks'][t]['accuracy']:.1f} | "
                     f"{result['headroom_per_task'][t]:+.1f} |")
    lines += ["", f"Mean over tasks: the chosen experts score {curse['mean_selection']:.1f} on "
              f"the selection sample and {curse['mean_test']:.1f} on the test examples (drop "
              f"{curse['mean_drop']:+.1f}); the base model scores {curse['base_selection']:.1f} "
              f"and {curse['base_test']:.1f} on the same two samples. One binomial standard "
              f"error at {curse['select']} examples and 50% is {curse['standard_error']:.1f} "
              "points."]
    if result["reliability"]:
        lines += _reliability_markdown(result["reliability"], tasks)
    metrics = [(m, name) for m, name in SCORING
               if m in next(iter(result["scoring"]["all tasks"].values()))]
    lines += ["", "## Scoring rules side by side (average over all tasks)", "",
              "| method | " + " | ".join(name for _, name in metrics) + " |",
              "|---|" + "---:|" * len(metrics)]
    for label, values in result["scoring"]["all tasks"].items():
        lines.append(f"| {label} | " + " | ".join(f"{values[m]:.1f}" for m, _ in metrics)
                     + " |")
    if labelled:
        lines += ["", "## Shares of predictions per option (fixed-option tasks)", "",
                  "Each cell: the share (%) of test examples on which the method chose each "
                  "option, and in brackets the distance from the answers' own shares "
                  "(total variation, points).", "",
                  "| method | " + " | ".join(_short(t) for t in labelled) + " |",
                  "|---|" + "---|" * len(labelled)]
        first = next(iter(by_label.values()))
        lines.append("| answers | " + " | ".join(" / ".join(
            f"{k} {v:.0f}" for k, v in first["tasks"][t]["answer_share"].items())
            for t in labelled) + " |")
        for label, r in by_label.items():
            lines.append(f"| {label} | " + " | ".join(
                " / ".join(f"{k} {v:.0f}" for k, v in r["tasks"][t]["prediction_share"].items())
                + f" ({result['prior_shift'][label][t]:.0f})" for t in labelled) + " |")
    lines += ["", "## What the experts learned, and MBC on each space", "",
              "Cosine similarity between private experts (off the diagonal):", "",
              "| compared | min | median | max |", "|---|---:|---:|---:|"]
    for label, v in result["separation"].items():
        lines.append(f"| {label} | {v['min']:.3f} | {v['median']:.3f} | {v['max']:.3f} |")
    if result["spaces"]:
        lines += ["", "| space | cluster sizes | silhouette | degenerate | Arrow MBC | "
                  "uniform MBC |", "|---|---|---:|---|---:|---:|"]
        for space, v in result["spaces"].items():
            silhouette = ", ".join(f"{s:.3f}" for s in (v["silhouette"] or {}).values())
            acc = v["accuracy"]["all tasks"]
            cells = [f"{x:.1f}" for x in acc.values()] + ["not built"] * (2 - len(acc))
            lines.append(f"| {space} | {', '.join(map(str, v['sizes']))} | {silhouette} | "
                         f"{v['degenerate'] or 'no'} | " + " | ".join(cells) + " |")
        for space, v in result["spaces"].items():
            lines += ["", f"Clusters of the {space} space:", ""]
            lines += [f"- {name}: {', '.join(members)}" for name, members in v["clusters"].items()]
    lines += ["", f"Transfer matrix on the selection sample: `{stem}_transfer.png`; the two "
              f"similarity matrices side by side: `{stem}_mbc_spaces.png`."]
    return "\n".join(lines) + "\n"


def _transfer_plot(selection: dict, rule: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(selection["values"])
    tasks = selection["tasks"]
    base = selection["values"]["base"]
    matrix = np.array([[selection["values"][r][t] - base[t] for t in tasks] for r in rows])
    limit = max(1.0, float(np.abs(matrix).max()))
    figure, axis = plt.subplots(figsize=(2 + 0.6 * len(tasks), 2 + 0.3 * len(rows)))
    image = axis.imshow(matrix, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    labels = [_short(t) + ("" if rule[t]["informative"] else " (no)") for t in tasks]
    axis.set_xticks(range(len(tasks)), labels, rotation=60, ha="right", fontsize=7)
    axis.set_yticks(range(len(rows)), [r if r != "base" else f"base ({0:+.0f})" for r in rows],
                    fontsize=7)
    for i in range(len(rows)):
        for j in range(len(tasks)):
            axis.text(j, i, f"{matrix[i, j]:+.0f}", ha="center", va="center", fontsize=5)
    figure.colorbar(image, ax=axis, label="accuracy minus base (points)")
    axis.set_title("Each private expert alone on the held-out tasks' selection sample")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _spaces_plot(names: list[str], params: np.ndarray, update: np.ndarray, spaces: dict,
                 path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = (spaces.get("update") or spaces.get("params") or {}).get("clusters") or {}
    order = [names.index(m) for members in clusters.values() for m in members if m in names]
    order += [i for i in range(len(names)) if i not in order]
    figure, axes = plt.subplots(1, 2, figsize=(16, 7.5))
    off = ~np.eye(len(names), dtype=bool)
    for axis, (title, matrix) in zip(axes, (("flattened parameters (the paper's)", params),
                                            ("updates s B A (what training changed)", update)),
                                     strict=True):
        shown = matrix[np.ix_(order, order)]
        image = axis.imshow(shown, cmap="viridis", vmin=matrix[off].min(),
                            vmax=matrix[off].max(), interpolation="nearest")
        axis.set_xticks(range(len(order)), [names[i] for i in order], rotation=90, fontsize=6)
        axis.set_yticks(range(len(order)), [names[i] for i in order], fontsize=6)
        axis.set_title(f"cosine of {title}", fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.suptitle("Private experts, ordered by the update-space MBC clusters")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
