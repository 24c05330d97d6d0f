"""The families benchmark's tables (Markdown) and bar plot, from its JSON record alone (so
`python -m benchmarks.families --report-only` rewrites them without a run folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common import provenance_line

GROUP_ORDER = ("relatives (setting)", "relatives (family)", "relatives", "strangers", "all")
METRIC_TEXT = {"score": "score (%, reasoning-gym's own scorer)",
               "exact_match": "exact match (%)",
               "answer_loglik": "answer log-likelihood (nats per answer token; higher is "
                                "better)"}


def _number(value: float, metric: str) -> str:
    return f"{value:.3f}" if metric == "answer_loglik" else f"{value:.1f}"


def _signed(value: float, metric: str) -> str:
    return f"{value:+.3f}" if metric == "answer_loglik" else f"{value:+.1f}"


def _short(task: str) -> str:
    return task.removeprefix("gym:")


def markdown(record: dict, plot: str | None = None) -> str:
    """The whole results page; `plot` names the bar plot beside it."""
    budget, timings = record["budget"], record["timings_s"]
    build = f"{timings['build'] / 60:.0f} min to build the libraries (summed over the runs " \
            "that built them)" if timings.get("build") else "libraries built earlier"
    evaluate = f"{timings['evaluate_this_run'] / 60:.0f} min to evaluate in this run"
    if timings.get("evaluate_methods") is not None:  # records from before it was kept lack it
        evaluate += (f" (the methods' evaluations took {timings['evaluate_methods'] / 60:.0f} "
                     "min when they ran, own-task gains and the selection sample not counted)")
    lines = [
        "# What a library buys on tasks with relatives (reasoning-gym families)", "",
        provenance_line(record), "",
        f"{build}; {evaluate}." + (f" Plot: [`{plot}`]({plot})." if plot else ""), "",
        f"SmolLM2-135M-Instruct ({budget['dtype']}), LoRA r=4 on all linear layers, lr "
        f"{budget['lr']:g}, batch {budget['batch']}, at most {budget['max_length']} tokens. "
        f"{len(record['train'])} private experts ({budget['private_steps']} steps), MBC on "
        f"parameters and on updates ({budget['clusters']} clusters, {budget['cluster_steps']} "
        f"steps), a shared expert ({budget['shared_steps']} steps), the uniform merge of the "
        f"private experts. Held-out tasks scored on {budget['limit']} examples each after a "
        f"selection sample of {budget['select']} (the oracle's choice: the private expert "
        "with the lowest answer loss on it). Intervals: 95% paired bootstrap, examples "
        "resampled within tasks.", "",
    ]
    lines += _own_task(record)
    lines += ["## Held-out tasks", "", "| task | group | family |", "|---|---|---|"]
    families = record.get("held_out_families", {})
    for task, group in record["held_out"].items():
        lines.append(f"| {_short(task)} | {group} | {families.get(task, '')} |")
    lines.append("")
    for metric in ("answer_loglik", "score", "exact_match"):
        lines += _comparison(record, metric)
    lines += _per_task(record, "answer_loglik") + _per_task(record, "score")
    lines += ["## The oracle's experts (chosen on the selection sample)", ""]
    lines += [f"- {_short(t)}: {e}" for t, e in record["oracle"].items()] + [""]
    lines += _mbc(record) + _routing(record)
    return "\n".join(lines) + "\n"


def _own_task(record: dict) -> list[str]:
    gains = record["own_task"]
    learned = [n for n, g in gains.items() if g["loglik_gain"]["excludes_zero"]
               and g["loglik_gain"]["difference"] > 0]
    lines = [
        "## Own-task gains: did each expert learn its task?", "",
        f"Each private expert against the base model on its own task's test examples. "
        f"{len(learned)} of {len(gains)} experts improved their task's answer log-likelihood "
        "beyond its 95% interval.", "",
        "| expert | family | n | score base / expert | answer log-lik base / expert | "
        "log-lik gain (95%) | score gain (95%) |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, g in gains.items():
        ll, sc = g["loglik_gain"], g["score_gain"]
        lines.append(
            f"| {name} | {g['family']} | {g['examples']} | {g['base_score']:.1f} / "
            f"{g['expert_score']:.1f} | {g['base_answer_loglik']:.3f} / "
            f"{g['expert_answer_loglik']:.3f} | {ll['difference']:+.3f} ({ll['ci'][0]:+.3f} "
            f"to {ll['ci'][1]:+.3f}) | {sc['difference']:+.1f} ({sc['ci'][0]:+.1f} to "
            f"{sc['ci'][1]:+.1f}) |")
    nothing = [n for n in gains if n not in learned]
    lines += ["", "Learned nothing measurable (log-likelihood gain not above 0 beyond its "
              f"interval): {', '.join(nothing) if nothing else 'none'}.", ""]
    return lines


def _comparison(record: dict, metric: str) -> list[str]:
    table = record["comparison"][metric]
    groups = [g for g in GROUP_ORDER if g in table]
    lines = [f"## {METRIC_TEXT[metric]}", "",
             "Average over each group's tasks; below it, the method minus the uniform merge "
             "(paired, 95% interval). The oracle's row minus the uniform merge is the "
             "headroom.", "",
             "| method | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for label in table[groups[0]]:
        cells = []
        for group in groups:
            entry = table[group][label]
            cell = f"{_number(entry['average'], metric)}"
            if label != "uniform merge":
                d = entry["vs_uniform"]
                mark = "**" if d["excludes_zero"] else ""
                cell += (f"<br>{mark}{_signed(d['difference'], metric)}{mark} "
                         f"({_signed(d['ci'][0], metric)} to {_signed(d['ci'][1], metric)})")
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", "Bold: the interval excludes 0.", ""]


def _per_task(record: dict, metric: str) -> list[str]:
    methods = record["methods"]
    tasks = list(next(iter(methods.values())))
    lines = [f"### Per task: {METRIC_TEXT[metric]}", "",
             "| method | " + " | ".join(_short(t) for t in tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for label, per_task in methods.items():
        lines.append(f"| {label} | " + " | ".join(_number(per_task[t][metric], metric)
                                                  for t in tasks) + " |")
    return lines + [""]


def _mbc(record: dict) -> list[str]:
    lines = ["## MBC against the families", "",
             "Adjusted Rand index between each space's clusters and the private experts' "
             "reasoning-gym categories (1: the same partition), against random clusterings "
             "of the same sizes (mean and 95th percentile of 1,000).", "",
             "| space | clusters (sizes) | ARI with the families | random: mean / 95th pct | "
             "heatmap |", "|---|---|---:|---:|---|"]
    for label, m in record["mbc"].items():
        lines.append(f"| {m['space']} ({label}) | {m['sizes']} | {m['agreement']:.2f} | "
                     f"{m['chance']['mean']:.2f} / {m['chance']['p95']:.2f} | "
                     f"[{m['heatmap']}]({m['heatmap']}) |")
    for label, m in record["mbc"].items():
        lines += ["", f"{label} clusters:", ""]
        lines += [f"- {c}: {', '.join(members)}" for c, members in m["clusters"].items()]
    return lines + [""]


def _routing(record: dict) -> list[str]:
    shares = record["routing_shares"]
    if not shares:
        return []
    lines = ["## Routing against the families", "",
             "For each held-out relative: the share of the router's weight (summed over "
             "tokens and layers) that went to experts of the task's own family, against "
             "chance (the family's share of the library); and the range over layers.", "",
             "| method | task | share of weight | chance | layers: min to max |",
             "|---|---|---:|---:|---:|"]
    for label, per_task in shares.items():
        for task, s in per_task.items():
            layers = list(s["per_layer"].values())
            lines.append(f"| {label} | {_short(task)} | {s['overall']:.2f} | "
                         f"{s['chance']:.2f} | {min(layers):.2f} to {max(layers):.2f} |")
        mean = np.mean([s["overall"] - s["chance"] for s in per_task.values()])
        lines.append(f"| {label} | mean over relatives, share minus chance | "
                     f"{mean:+.2f} | | |")
    return lines + [""]


def bar_plot(record: dict, path: Path) -> None:
    """Answer log-likelihood per method on relatives and on strangers, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = record["comparison"]["answer_loglik"]
    groups = [g for g in ("relatives", "strangers") if g in table]
    labels = list(table[groups[0]])
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        means = [table[group][m]["average"] for m in labels]
        low = [mean - table[group][m]["ci"][0] for m, mean in zip(labels, means, strict=True)]
        high = [table[group][m]["ci"][1] - mean for m, mean in zip(labels, means, strict=True)]
        axis.bar(np.arange(len(labels)) + i * width, means, width, yerr=[low, high],
                 capsize=3, label=group)
    axis.set_xticks(np.arange(len(labels)) + width * (len(groups) - 1) / 2, labels,
                    rotation=30, ha="right")
    axis.set_ylabel("answer log-likelihood (nats/token)")
    axis.set_title("Held-out reasoning-gym tasks: relatives and strangers (95% intervals)")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
