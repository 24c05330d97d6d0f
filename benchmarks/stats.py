"""The statistics the benchmarks report: per-example values of a report, paired bootstrap
intervals, headroom, agreement of clusters with known groups against chance, and routing
shares. Plain numpy; tested in tests/test_benchmark_stats.py on hand-computed cases."""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 2000


def per_example(report: dict, metric: str = "accuracy", scale: float = 1.0
                ) -> dict[str, np.ndarray]:
    """`{task: values}` of one metric, example by example, from an evaluation report (times
    `scale`: 100 for hit rates in %)."""
    return {task: scale * np.asarray(r["per_example"][metric], dtype=float)
            for task, r in report["tasks"].items()}


def bootstrap_average(per_task: list[dict[str, np.ndarray]], seed: int = 0,
                      draws: int = BOOTSTRAP, scale: float = 1.0) -> np.ndarray:
    """(draws, methods) bootstrap samples of the average over tasks of each method's mean
    per-example value (times `scale`). Examples are resampled within each task, with the
    same draws for every method (so differences between methods are paired); every method
    must score the same examples of the same tasks (those of `per_task[0]`)."""
    rng = np.random.default_rng(seed)
    tasks = list(per_task[0])
    totals = np.zeros((draws, len(per_task)))
    for task in tasks:
        n = len(per_task[0][task])
        picks = rng.integers(0, n, size=(draws, n))
        for m, values in enumerate(per_task):
            totals[:, m] += np.asarray(values[task], dtype=float)[picks].mean(axis=1)
    return scale * (totals / len(tasks))


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap samples."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(samples: np.ndarray, first: int, second: int) -> dict:
    """Method `first` minus method `second` over the same bootstrap draws: the mean
    difference, its 95% interval, and whether the interval excludes 0."""
    diff = samples[:, first] - samples[:, second]
    low, high = interval(diff)
    return {"difference": float(diff.mean()), "ci": (low, high),
            "excludes_zero": bool(low > 0 or high < 0)}


def paired(first: dict[str, np.ndarray], second: dict[str, np.ndarray], scale: float = 1.0,
           seed: int = 0) -> dict:
    """`first` minus `second` (per-example values of the same tasks and examples), averaged
    over tasks: `paired_difference` of their paired bootstrap (times `scale`)."""
    return paired_difference(bootstrap_average([first, second], seed=seed, scale=scale), 0, 1)


def oracle_choice(selection: dict[str, dict[str, float]], higher_is_better: bool = True
                  ) -> dict[str, str]:
    """For each task, the expert with the best selection value (`{expert: {task: value}}`);
    ties go to the first expert in name order."""
    experts = sorted(selection)
    tasks = selection[experts[0]]
    sign = 1 if higher_is_better else -1
    return {task: max(experts, key=lambda e: (sign * selection[e][task], -experts.index(e)))
            for task in tasks}


def chance_agreement(truth: list[str], sizes: list[int], draws: int = 1000,
                     seed: int = 0) -> dict:
    """The adjusted Rand index between `truth` and random clusterings with the given cluster
    sizes (members drawn at random): its mean and 95th percentile, the bar a real
    clustering must clear to be better than chance."""
    from sklearn.metrics import adjusted_rand_score

    if sum(sizes) != len(truth):
        raise ValueError(f"cluster sizes {sizes} do not add up to {len(truth)} experts")
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    scores = [adjusted_rand_score(truth, rng.permutation(labels)) for _ in range(draws)]
    return {"mean": float(np.mean(scores)), "p95": float(np.percentile(scores, 95))}


def family_share(weights: dict[str, np.ndarray], families: list[str], family: str) -> dict:
    """The share of routing weight (`{layer: weight per expert}`) that went to experts of
    `family` (`families[i]` is expert i's), per layer and over all layers, against chance:
    the family's share of the experts."""
    members = np.array([f == family for f in families])
    per_layer = {layer: float(np.asarray(w)[members].sum() / max(np.asarray(w).sum(), 1e-12))
                 for layer, w in weights.items()}
    total = sum(np.asarray(w).sum() for w in weights.values())
    overall = sum(np.asarray(w)[members].sum() for w in weights.values()) / max(total, 1e-12)
    return {"overall": float(overall), "per_layer": per_layer,
            "chance": float(members.mean())}
