"""The transfer matrix: every expert (and the base model) scored on every task."""

from __future__ import annotations

import pytest
import torch

from quiver.data.batching import tokenize_example
from quiver.data.task import SplitConfig
from quiver.errors import QuiverError
from quiver.evaluation.transfer import TransferConfig, transfer_matrix
from quiver.models import fingerprint

from .conftest import make_task


def test_loss_matrix_has_a_row_per_expert_and_the_base_row_is_the_plain_loss(tiny,
                                                                               tiny_library):
    model, tokenizer = tiny
    before = fingerprint(model)
    tasks = [make_task("toy:alpha"), make_task("toy:beta")]
    config = TransferConfig(limit=4, split="valid")
    report = transfer_matrix(model, tokenizer, tiny_library, tasks, config=config,
                             show_progress=False)
    assert list(report["values"]) == ["base", "alpha", "beta"]
    assert report["tasks"] == ["toy:alpha", "toy:beta"]
    assert report["examples"] == {"toy:alpha": 4, "toy:beta": 4}
    assert report["expert_tasks"] == {"alpha": ["toy:alpha"], "beta": ["toy:beta"]}
    assert fingerprint(model) == before  # experts detached again

    # the base row, computed independently: transformers' own loss, one example at a time,
    # weighted by its number of target tokens
    total, count = 0.0, 0
    for example in tasks[0].split("valid", SplitConfig())[:4]:
        ids = tokenize_example(tokenizer, example, 512)
        input_ids = torch.tensor([ids.input_ids])
        labels = input_ids.clone()
        labels[0, : ids.n_prompt] = -100
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels).loss.item()
        n = len(ids) - ids.n_prompt
        total, count = total + loss * n, count + n
    assert report["values"]["base"]["toy:alpha"] == pytest.approx(total / count, rel=1e-4)
    # each expert moved the loss away from the base model's
    assert report["values"]["alpha"]["toy:alpha"] != report["values"]["base"]["toy:alpha"]


def test_accuracy_matrix_uses_the_harness(tiny, tiny_library):
    model, tokenizer = tiny
    report = transfer_matrix(model, tokenizer, tiny_library, [make_task("toy:alpha")],
                             experts=["beta"], config=TransferConfig(metric="accuracy", limit=2),
                             show_progress=False)
    assert list(report["values"]) == ["base", "beta"]
    assert all(0 <= row["toy:alpha"] <= 100 for row in report["values"].values())


def test_bad_input_is_refused(tiny, tiny_library):
    model, tokenizer = tiny
    with pytest.raises(QuiverError, match="no tasks"):
        transfer_matrix(model, tokenizer, tiny_library, [], show_progress=False)
    with pytest.raises(QuiverError, match="no expert named"):
        transfer_matrix(model, tokenizer, tiny_library, [make_task()], experts=["nobody"],
                        show_progress=False)
    with pytest.raises(QuiverError, match="no examples in its valid split"):
        transfer_matrix(model, tokenizer, tiny_library, [make_task(n=1)], show_progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        TransferConfig(metric="bleu")
