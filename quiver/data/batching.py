"""Tokenising examples and batching them without padding waste.

Training sees `prompt + target + eos` with the loss on the target tokens only. Batches are
grouped by length: shuffle, cut into "mega-batches" of `batch_size * group` examples, sort
each by length and slice it into batches, then shuffle the batches. Every batch then holds
examples of nearly equal length, so almost no compute is spent on padding, and the order is
still random from one batch to the next.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from quiver.data.task import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + target; the first `n_prompt` carry no loss. `task`: the index of
    its task among those trained together (a multi-task adapter routes by it)."""

    input_ids: tuple[int, ...]
    n_prompt: int
    task: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def split_trailing_space(prompt: str, target: str) -> tuple[str, str]:
    """Move the prompt's trailing whitespace onto the target ("A: " + "x" -> "A:" + " x").

    BPE tokenizers fold a leading space into the next word; tokenising "A: " and "x"
    separately would give the model a space token it never sees in running text.
    """
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped) :] + target


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int, task: int = 0
) -> TokenizedExample:
    """Tokenise for training; over-long examples lose the start of the prompt, not the target."""
    prompt, target = split_trailing_space(example.prompt, example.target)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    target_ids = target_ids + [tokenizer.eos_token_id]
    if not prompt_ids:  # the first target token needs something to be predicted from
        prompt_ids = [tokenizer.bos_token_id or tokenizer.eos_token_id]
    target_ids = target_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(target_ids)) :]
    return TokenizedExample(tuple(prompt_ids + target_ids), len(prompt_ids), task)


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, group: int = 64
) -> list[list[int]]:
    """Indices into `lengths`, in batches of similar length, in a seeded random order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * group
    for start in range(0, len(order), span):
        mega = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches.extend(mega[i : i + batch_size] for i in range(0, len(mega), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (prompt and padding ignored),
    and each row's `task_ids` (its `TokenizedExample.task`)."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids)
        input_ids[row, : len(ids)] = ids
        labels[row, example.n_prompt : len(ids)] = ids[example.n_prompt :]
        attention_mask[row, : len(ids)] = 1
    task_ids = torch.tensor([e.task for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "task_ids": task_ids}


def micro_batches(
    examples: list[TokenizedExample], max_tokens: int
) -> list[list[TokenizedExample]]:
    """Split a batch so that each part holds at most `max_tokens` padded tokens (rows x width).

    Gradient accumulation over the parts gives the gradient of the whole batch while holding
    the activations of one part only. A batch within the budget (or `max_tokens` 0) stays one
    part, in its order. Otherwise rows are taken longest first, so each part is padded to its
    own, shorter width; a row longer than the budget is a part of its own.
    """
    width = max(len(e) for e in examples)
    if max_tokens <= 0 or width * len(examples) <= max_tokens:
        return [examples]
    parts: list[list[TokenizedExample]] = []
    for example in sorted(examples, key=len, reverse=True):
        if parts and len(parts[-1][0]) * (len(parts[-1]) + 1) <= max_tokens:
            parts[-1].append(example)  # the part's first row is its widest
        else:
            parts.append([example])
    return parts
