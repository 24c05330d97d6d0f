"""The families benchmark's task lists (benchmarks/gym_lists.py) follow their stated rule."""

from __future__ import annotations

from benchmarks import gym_lists as lists
from quiver.data import gym


def _generator(name: str) -> str:
    return gym.parse_name(name)[0]


def test_training_tasks_span_at_least_five_families_with_several_experts_each():
    families = [gym.family(_generator(t)) for t in lists.TRAIN]
    assert len(lists.TRAIN) == len(set(lists.TRAIN)) >= 24
    assert len(set(families)) >= 5
    assert sum(families.count(f) >= 2 for f in set(families)) >= 5


def test_relatives_and_strangers_follow_the_rule():
    trained = {_generator(t): t for t in lists.TRAIN}
    trained_families = {gym.family(g) for g in trained}
    for task in lists.RELATIVES_BY_SETTING:  # a trained generator at an untrained setting
        assert _generator(task) in trained and task not in lists.TRAIN
        assert gym.canonical_name(*gym.parse_name(task)) == task
    for task in lists.RELATIVES_BY_FAMILY:  # another generator of a family with experts
        assert _generator(task) not in trained
        assert gym.family(_generator(task)) in trained_families
    for task in lists.STRANGERS:  # a family with no expert
        assert gym.family(_generator(task)) not in trained_families
    assert not set(lists.HELD_OUT) & set(lists.TRAIN)
    assert {lists.group_of(t) for t in lists.HELD_OUT} == {
        "relative (setting)", "relative (family)", "stranger"}


def test_group_of_reads_any_spelling_of_a_held_out_name():
    """quiver names a task canonically (knobs sorted): the reports' names must find their
    group too (decimal_chain_sum's list spelling is not its canonical one)."""
    from quiver.data import load_task

    for task in lists.HELD_OUT:
        assert lists.group_of(load_task(task).name) == lists.group_of(task)
