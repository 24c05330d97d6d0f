"""benchmarks/stats.py on hand-computed cases: per-example values of a report, paired
bootstrap, intervals, the oracle's choice, chance agreement of clusters and routing shares."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import stats


def test_bootstrap_of_constant_values_is_their_average_over_tasks():
    """Task a: every example 1.0; task b: every example 0.0 (method 0) or 0.5 (method 1):
    every resample gives (1 + 0) / 2 = 0.5 and (1 + 0.5) / 2 = 0.75."""
    per_task = [{"a": np.ones(4), "b": np.zeros(6)}, {"a": np.ones(4), "b": np.full(6, 0.5)}]
    samples = stats.bootstrap_average(per_task, draws=50)
    assert samples.shape == (50, 2)
    np.testing.assert_allclose(samples[:, 0], 0.5)
    np.testing.assert_allclose(samples[:, 1], 0.75)
    assert stats.paired_difference(samples, 1, 0) == {
        "difference": pytest.approx(0.25), "ci": (pytest.approx(0.25), pytest.approx(0.25)),
        "excludes_zero": True}


def test_per_example_reads_one_metric_of_every_task_scaled():
    report = {"tasks": {"a": {"per_example": {"accuracy": [1, 0, 1, 1], "score": [0.5] * 4}},
                        "b": {"per_example": {"accuracy": [0, 0], "score": [1.0, 0.0]}}}}
    hits = stats.per_example(report, scale=100)
    assert list(hits) == ["a", "b"]
    np.testing.assert_array_equal(hits["a"], [100, 0, 100, 100])
    np.testing.assert_array_equal(hits["b"], [0, 0])
    np.testing.assert_array_equal(stats.per_example(report, "score")["b"], [1.0, 0.0])


def test_scaled_bootstrap_is_the_bootstrap_times_the_scale():
    """The same draws (same seed), every value 100 times larger: hit rates in %."""
    per_task = [{"a": np.array([1.0, 0.0, 1.0]), "b": np.array([0.0, 1.0])}]
    plain = stats.bootstrap_average(per_task, draws=30, seed=4)
    np.testing.assert_allclose(stats.bootstrap_average(per_task, draws=30, seed=4, scale=100),
                               100 * plain)


def test_paired_of_two_methods_is_their_difference_over_tasks():
    """Task a: 1 against 0 on every example; task b: equal. Every draw: (100 + 0) / 2 = 50
    points. The same values on both sides: exactly 0, an interval that touches 0."""
    first = {"a": np.ones(5), "b": np.array([1.0, 0.0, 1.0])}
    second = {"a": np.zeros(5), "b": np.array([1.0, 0.0, 1.0])}
    assert stats.paired(first, second, scale=100) == {
        "difference": pytest.approx(50), "ci": (pytest.approx(50), pytest.approx(50)),
        "excludes_zero": True}
    same = stats.paired(first, first)
    assert same["difference"] == 0 and same["ci"] == (0, 0) and not same["excludes_zero"]


def test_paired_draws_cancel_what_both_methods_share():
    """Method 1 = method 0 + 0.1 on every example: unpaired, each mean varies; paired, the
    difference is exactly 0.1 on every draw."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=30)
    samples = stats.bootstrap_average([{"t": values}, {"t": values + 0.1}], draws=200)
    assert samples[:, 0].std() > 0.05
    np.testing.assert_allclose(samples[:, 1] - samples[:, 0], 0.1)


def test_bootstrap_interval_covers_the_mean_of_a_coin():
    """20 hits of 40: the average is 0.5; the 95% interval is about 0.5 +- 1.96 * 0.079."""
    hits = np.array([1.0, 0.0] * 20)
    samples = stats.bootstrap_average([{"t": hits}], draws=4000, seed=3)
    low, high = stats.interval(samples[:, 0])
    assert low == pytest.approx(0.5 - 1.96 * 0.079, abs=0.03)
    assert high == pytest.approx(0.5 + 1.96 * 0.079, abs=0.03)
    difference = stats.paired_difference(np.stack([samples[:, 0], samples[:, 0]], 1), 0, 1)
    assert difference["difference"] == 0 and not difference["excludes_zero"]


def test_interval_is_the_central_percentiles():
    samples = np.arange(1, 1001, dtype=float)
    assert stats.interval(samples) == pytest.approx((25.975, 975.025))
    assert stats.interval(samples, level=0.5) == pytest.approx((250.75, 750.25))


def test_oracle_picks_the_best_selection_value_per_task_first_name_on_ties():
    selection = {"b": {"t1": 0.2, "t2": 0.9}, "a": {"t1": 0.2, "t2": 0.1},
                 "c": {"t1": 0.1, "t2": 0.9}}
    assert stats.oracle_choice(selection) == {"t1": "a", "t2": "b"}
    assert stats.oracle_choice(selection, higher_is_better=False) == {"t1": "c", "t2": "a"}


def test_chance_agreement_of_random_clusters_is_near_zero_and_checks_sizes():
    truth = ["x"] * 6 + ["y"] * 6 + ["z"] * 6
    chance = stats.chance_agreement(truth, [6, 6, 6], draws=400)
    assert abs(chance["mean"]) < 0.05 and 0 < chance["p95"] < 0.3
    with pytest.raises(ValueError, match="do not add up"):
        stats.chance_agreement(truth, [6, 6])


def test_family_share_is_the_weight_on_the_family_s_experts():
    """Experts: arithmetic, arithmetic, logic, games. Layer 1 gives them 1, 1, 2, 0; layer 2
    gives 3, 0, 0, 1: arithmetic gets 2/4 and 3/4, 5/8 overall; chance is 2/4."""
    weights = {"l1": np.array([1.0, 1.0, 2.0, 0.0]), "l2": np.array([3.0, 0.0, 0.0, 1.0])}
    share = stats.family_share(weights, ["arithmetic", "arithmetic", "logic", "games"],
                               "arithmetic")
    assert share == {"overall": 0.625, "per_layer": {"l1": 0.5, "l2": 0.75}, "chance": 0.5}
