"""The training objective: mean cross-entropy over an answer's target tokens.

Computed on the target tokens only: the decoder runs on the whole sequence, but the output
projection (vocabulary 49k on SmolLM2) and the cross-entropy only on target positions, which
is most of what makes quiver's loop faster than a textbook one on a CPU.

A multi-task adapter (`quiver.adapters`: Poly/MHR, MTL-LoRA) needs the task of every batch
row while the model runs: `route` gives, for a batch, the context within which it runs that
way (`TrainableAdapter.routed`). It spans the forward and the backward pass, since gradient
checkpointing recomputes the forward during the backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from quiver.data.batching import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    length_grouped_batches,
    micro_batches,
)

Route = Callable[[dict[str, torch.Tensor]], AbstractContextManager]


def target_only_loss(causal_lm: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over target tokens, projecting only those positions to the vocabulary.

    Equal to `causal_lm(**batch).loss` (the full-logits loss) for models whose logits are just
    `lm_head(hidden)`, at a fraction of the cost when prompts are longer than targets.
    """
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (batch, time, hidden)
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != IGNORE_INDEX  # (batch, time - 1)
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])  # (targets, vocab)
    return F.cross_entropy(logits.float(), labels[keep])


def accumulate_gradients(
    causal_lm: PreTrainedModel,
    examples: list[TokenizedExample],
    pad_id: int,
    max_tokens: int = 0,
    device: torch.device | str | None = None,
    route: Route | None = None,
) -> tuple[float, int]:
    """Backpropagate the mean target loss of `examples` as one batch, in parts of at most
    `max_tokens` padded tokens (0: in one go), each part within `route(part)` if given.

    Each part's mean loss is weighted by its share of the batch's target tokens, so the
    accumulated gradient is that of the whole batch's mean loss (up to float rounding) while
    only one part's activations are alive at a time. Dropout draws its masks part by part, so
    with dropout the masks (not their distribution) differ from a run in one go.

    Returns:
        The batch's mean target loss and its number of real (unpadded) tokens.
    """
    device = device or next(causal_lm.parameters()).device
    parts = [collate(part, pad_id) for part in micro_batches(examples, max_tokens)]
    targets = [int((part["labels"][:, 1:] != IGNORE_INDEX).sum()) for part in parts]
    loss_sum, tokens = 0.0, 0
    for part, n in zip(parts, targets, strict=True):
        part = {k: v.to(device) for k, v in part.items()}
        with route(part) if route is not None else nullcontext():
            loss = target_only_loss(causal_lm, part) * (n / sum(targets))  # x 1.0 for one part
            loss.backward()
        loss_sum += loss.item()
        tokens += int(part["attention_mask"].sum())
    return loss_sum, tokens


@torch.no_grad()
def mean_target_loss(
    causal_lm: PreTrainedModel,
    examples: list[TokenizedExample],
    pad_id: int,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    route: Route | None = None,
) -> float:
    """Mean cross-entropy per target token over `examples` (NaN if there are none), each batch
    within `route(batch)` if given.

    Every target token weighs the same, whichever example it is in; batches are grouped by
    length (seed 0) so almost nothing is padding. The model is used as it is (call `.eval()`
    first to switch dropout off).
    """
    if not examples:
        return math.nan
    device = device or next(causal_lm.parameters()).device
    total, count = 0.0, 0
    lengths = [len(e) for e in examples]
    for indices in length_grouped_batches(lengths, batch_size, seed=0):
        batch = collate([examples[i] for i in indices], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        with route(batch) if route is not None else nullcontext():
            total += target_only_loss(causal_lm, batch).item() * n
        count += n
    return total / count
