"""Scoring a model on examples: log-likelihood multiple choice and greedy generation.

Multiple choice (as in the paper and BIG-bench): the log-probability of each option given the
prompt; the prediction is the option with the highest total log-probability (`accuracy`),
the highest mean log-probability per token (`accuracy_norm`, length-normalised), per
character (`accuracy_char_norm`, lm-evaluation-harness's `acc_norm`), or, with calibration,
the highest log-probability above the option's own after a content-free prompt
(`accuracy_calibrated`, Zhao et al. 2021, "Calibrate Before Use"). The prompt
is run once per example and its KV cache is shared by all the options, which are scored
together in one right-padded batch; `score_choices_batch` does several examples at once
(prompts left-padded), which is how the harness calls it. `score_continuations` is the same
on token ids, with whether each continuation is the greedy one (the lm-eval bridge's
`loglikelihood`).

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
        return _argmax(values)

    def prediction_per_char(self, options: tuple[str, ...]) -> int:
        """lm-evaluation-harness's `acc_norm`: log-probability over the option's length in
        characters (the option alone: lm-eval counts the choice, not the space before it)."""
        return _argmax([lp / max(1, len(o)) for lp, o in
                        zip(self.log_probs, options, strict=True)])

    def prediction_calibrated(self, content_free: list[float]) -> int:
        """Content-free calibration (Zhao et al., 2021): each option's log-probability minus
        its log-probability after a content-free prompt, so an option the model favours
        whatever the question loses that prior."""
        return _argmax([lp - free for lp, free in
                        zip(self.log_probs, content_free, strict=True)])


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties: the first option


def score_choices(model, tokenizer: PreTrainedTokenizerBase, example: Example) -> ChoiceScores:
    """Log-probability of each option of `example` (prompt scored once, options batched)."""
    return score_choices_batch(model, tokenizer, [example])[0]


@torch.no_grad()
def score_choices_batch(model, tokenizer: PreTrainedTokenizerBase,
                        examples: list[Example]) -> list[ChoiceScores]:
    """`score_choices` for several examples at once: the prompts in one left-padded batch,
    then every option of every example in one right-padded batch on the prompts' KV cache."""
    prompts, options = [], []  # token ids per example; per example, per option
    for example in examples:
        prompt, _ = split_trailing_space(example.prompt, "")
        trailing = example.prompt[len(prompt) :]
        prompts.append(tokenizer(prompt, add_special_tokens=False)["input_ids"] or
                       [tokenizer.bos_token_id or tokenizer.eos_token_id])
        options.append([tokenizer(trailing + o, add_special_tokens=False)["input_ids"] or
                        [tokenizer.eos_token_id] for o in example.options])
    scored = score_continuations(model, prompts, options, tokenizer.pad_token_id)
    return [ChoiceScores([log_prob for log_prob, _ in rows], [len(o) for o in opts])
            for rows, opts in zip(scored, options, strict=True)]


@torch.no_grad()
def score_continuations(model, prompts: list[list[int]], continuations: list[list[list[int]]],
                        pad: int) -> list[list[tuple[float, bool]]]:
    """Token-level scoring: for each prompt (token ids, non-empty) and each of its
    continuations (token ids, non-empty), the continuation's total log-probability and
    whether greedy decoding would produce it (every token the argmax).

    The prompts run once, in one left-padded batch; every continuation of every prompt then
    runs in one right-padded batch on the prompts' KV cache (a prompt is never recomputed for
    its options). `score_choices_batch` and the lm-evaluation-harness bridge call it.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), pad, device=device)  # left-padded
    prompt_mask = torch.zeros_like(prompt_ids)
    for row, ids in enumerate(prompts):
        prompt_ids[row, width - len(ids) :] = torch.tensor(ids)
        prompt_mask[row, width - len(ids) :] = 1
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
                logits_to_keep=1)  # only the last position's: the vocabulary head is costly
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # (B, vocab): option token 0

    owner = [b for b, opts in enumerate(continuations) for _ in opts]  # prompt of each row
    flat = [ids for opts in continuations for ids in opts]
    option_width = max(len(ids) for ids in flat)
    option_ids = torch.full((len(flat), option_width), pad, device=device)  # right-padded
    option_mask = torch.zeros_like(option_ids)
    for row, ids in enumerate(flat):
        option_ids[row, : len(ids)] = torch.tensor(ids)
        option_mask[row, : len(ids)] = 1
    owner_index = torch.tensor(owner, device=device)
    cache = out.cache
    cache.reorder_cache(owner_index)  # each option row gets its example's prompt cache
    lengths = torch.tensor([len(p) for p in prompts], device=device)[owner_index]
    positions = lengths[:, None] + torch.arange(option_width, device=device)
    logits = model(input_ids=option_ids, cache=cache, position_ids=positions,
                   attention_mask=torch.cat([prompt_mask[owner_index], option_mask], 1)).logits
    # log p(token j+1) = logit - logsumexp, without a (rows, W, vocab) log-softmax copy
    logits = logits.float()
    following = option_ids[:, 1:].clamp(min=0)  # (rows, W-1) the next token of each position
    picked = logits[:, :-1].gather(2, following[..., None])[..., 0] - logits[:, :-1].logsumexp(-1)
    picked = (picked * option_mask[:, 1:]).sum(1)  # (rows,) sum over each option's tokens
    first_ids = option_ids[:, 0]
    totals = first[owner_index, first_ids].double() + picked.double()  # as Python floats add
    misses = ((logits[:, :-1].argmax(-1) != following) * option_mask[:, 1:]).sum(1)
    greedy = (misses == 0) & (first.argmax(-1)[owner_index] == first_ids)
    results = list(zip(totals.tolist(), greedy.tolist(), strict=True))
    scores, start = [], 0
    for opts in continuations:
        scores.append(results[start : start + len(opts)])
        start += len(opts)
    return scores


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
