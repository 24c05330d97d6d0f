"""Scoring a model on examples: log-likelihood multiple choice and greedy generation.

Multiple choice (as in the paper and BIG-bench): the log-probability of each option given the
prompt; the prediction is the option with the highest total log-probability (`accuracy`) or
the highest mean log-probability per token (`accuracy_norm`, length-normalised). The prompt
is run once per example and its KV cache is shared by all the options, which are scored
together in one right-padded batch.

Generation: greedy decoding in left-padded batches, then BIG-bench's post-processing (cut
after `stop_string`, keep the first match of `output_regex`; its default regex keeps the text
up to the first `.`, `?`, `!`, `;` or newline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from quiver.data.batching import split_trailing_space
from quiver.data.task import Example

BIGBENCH_DEFAULT_REGEX = r"[^\.\?\!\;\n]+"


@dataclass
class ChoiceScores:
    """Per-option total log-probabilities and token counts of one example."""

    log_probs: list[float]
    n_tokens: list[int]

    def prediction(self, normalise: bool) -> int:
        values = [lp / n if normalise else lp for lp, n in
                  zip(self.log_probs, self.n_tokens, strict=True)]
        return max(range(len(values)), key=values.__getitem__)


@torch.no_grad()
def score_choices(model, tokenizer: PreTrainedTokenizerBase, example: Example) -> ChoiceScores:
    """Log-probability of each option of `example` (prompt scored once, options batched)."""
    device = next(model.parameters()).device
    prompt, _ = split_trailing_space(example.prompt, "")
    trailing = example.prompt[len(prompt) :]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [
        tokenizer.bos_token_id or tokenizer.eos_token_id
    ]
    options = [tokenizer(trailing + o, add_special_tokens=False)["input_ids"] or
               [tokenizer.eos_token_id] for o in example.options]
    prompt_tensor = torch.tensor([prompt_ids], device=device)  # (1, P)
    out = model(input_ids=prompt_tensor, use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)  # (vocab,) predicts option token 0
    n_options, width = len(options), max(len(o) for o in options)
    option_ids = torch.full((n_options, width), tokenizer.pad_token_id, device=device)
    option_mask = torch.zeros((n_options, width), dtype=torch.long, device=device)
    for row, ids in enumerate(options):
        option_ids[row, : len(ids)] = torch.tensor(ids)
        option_mask[row, : len(ids)] = 1
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_options)
    attention = torch.cat([option_mask.new_ones(n_options, len(prompt_ids)), option_mask], 1)
    positions = torch.arange(len(prompt_ids), len(prompt_ids) + width, device=device)
    logits = model(input_ids=option_ids, attention_mask=attention, past_key_values=cache,
                   position_ids=positions.expand(n_options, width)).logits  # (O, W, vocab)
    log_probs = torch.log_softmax(logits.float(), -1)
    totals = []
    for row, ids in enumerate(options):
        total = first[ids[0]].item()
        if len(ids) > 1:
            targets = torch.tensor(ids[1:], device=device)
            total += log_probs[row, : len(ids) - 1].gather(1, targets[:, None]).sum().item()
        totals.append(total)
    return ChoiceScores(totals, [len(o) for o in options])


@torch.no_grad()
def generate_answers(
    model,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_new_tokens: int,
    stop_string: str | None = None,
    output_regex: str | None = BIGBENCH_DEFAULT_REGEX,
) -> list[str]:
    """Greedy answers for a batch of prompts, post-processed as BIG-bench does."""
    device = next(model.parameters()).device
    prompts = [split_trailing_space(e.prompt, "")[0] for e in examples]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [postprocess(t, stop_string, output_regex) for t in texts]


def postprocess(text: str, stop_string: str | None, output_regex: str | None) -> str:
    """BIG-bench's `postprocess_output` (without its max_length), then strip spaces."""
    if stop_string:
        index = text.find(stop_string)
        if index > 0:
            text = text[: index + len(stop_string)]
    if output_regex:
        text = next(iter(re.findall(output_regex, text)), "")
    return text.strip()
