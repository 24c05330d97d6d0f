import random

import torch

from quiver.data import Example
from quiver.data.batching import (
    IGNORE_INDEX,
    collate,
    length_grouped_batches,
    split_trailing_space,
    tokenize_example,
)


def test_trailing_space_moves_to_the_target():
    assert split_trailing_space("Q: x\nA: ", "Paris") == ("Q: x\nA:", " Paris")
    assert split_trailing_space("no space", "y") == ("no space", "y")


def test_tokenized_example_masks_prompt_and_ends_with_eos(tiny):
    _, tokenizer = tiny
    tokenized = tokenize_example(tokenizer, Example("The capital is ", "Paris"), 64)
    batch = collate([tokenized], tokenizer.pad_token_id)
    labels = batch["labels"][0]
    assert (labels[: tokenized.n_prompt] == IGNORE_INDEX).all()
    target = tokenizer.decode(labels[tokenized.n_prompt:])
    assert target == " Paris" + tokenizer.eos_token


def test_truncation_keeps_the_target_and_the_end_of_the_prompt(tiny):
    _, tokenizer = tiny
    prompt = " ".join(f"w{i}" for i in range(200)) + " end:"
    tokenized = tokenize_example(tokenizer, Example(prompt, " answer"), 32)
    assert len(tokenized) == 32
    assert tokenizer.decode(tokenized.input_ids).endswith("end: answer" + tokenizer.eos_token)


def test_collate_pads_right_and_masks_padding():
    from quiver.data.batching import TokenizedExample

    batch = collate([TokenizedExample((1, 2, 3), 1), TokenizedExample((4, 5), 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]


def test_length_grouping_covers_every_example_once_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(2000)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(2000))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batches) / sum(lengths)

    order = list(range(2000))
    rng.shuffle(order)
    random_batches = [order[i:i + 8] for i in range(0, 2000, 8)]
    assert padding(batches) < 0.05 < padding(random_batches)
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=4)


def test_collate_output_is_long_tensors():
    from quiver.data.batching import TokenizedExample

    batch = collate([TokenizedExample((1, 2), 1)], pad_id=0)
    assert all(t.dtype == torch.long for t in batch.values())
