"""quiver as an lm-evaluation-harness model: a routed library scored where users evaluate.

    python -m quiver.lm_eval_bridge --model quiver \\
        --model_args library=./lib,method=arrow,top_k=4 --tasks arc_easy --batch_size 8
    quiver lm-eval ...                  # the same command line

Importing this module registers the model `quiver` with lm-eval (`pip install
'quiver[lm-eval]'`); `lm_eval.simple_evaluate(model="quiver", model_args={...})` then works
from Python, or pass a `QuiverLM` itself as `model=`. lm-eval 0.4.13 finds models only in
its own registry (it reads no plugin entry points), so its own `lm_eval --model quiver` cannot
see this one; `python -m quiver.lm_eval_bridge` (and `quiver lm-eval`) is lm-eval's command
line, unchanged, with this model registered first. quiver also declares the entry point
`lm_eval.models: quiver` for lm-eval versions that discover them.

Model arguments (`--model_args`):
    library     the library (folder or fsspec URL); needed by every method but `base`
    method      base | arrow | uniform | centroid | phatgoose | expert:NAME
                (default: arrow with a library, else base)
    top_k, temperature, gate_steps   routing, as `quiver eval` takes them
    general     GenKnowSub with Arrow: the general expert(s) subtracted first (NAME or
                NAME+NAME)
    experts     route between these experts only (NAME+NAME; default every expert)
    base        the base model (default smollm2-135m); dtype: auto | fp32 | bf16
    max_length  tokens of context kept (default the model's, at most 2048)
lm-eval's `--batch_size` (prompts per batch) and `--device` are used as given.

The three request types run on quiver's routed model:
- `loglikelihood`: requests are tokenized as lm-eval's own models do (context and
  continuation encoded together, then split); those with the same context are scored together
  by quiver's `score_continuations`: the context once, in a left-padded batch of contexts,
  every continuation in one batch on its KV cache, as `quiver eval` scores multiple choice.
- `loglikelihood_rolling`: lm-eval's rolling windows of `max_length` tokens, each scored
  the same way.
- `generate_until`: batched decoding (greedy unless the task asks to sample) that stops at
  the task's `until` strings or the end-of-sequence token.

lm-eval hands the model requests, not quiver task names, so `quiver eval`'s zero-shot check
(a task an expert was trained on is refused) is not made here, and multi-task entries
(Poly/MHR, MTL-LoRA: a routing row per task) and the oracle, which route by task, are refused.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence

import torch

from quiver.errors import QuiverError

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: see the registration)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # pragma: no cover - the extra is not installed
    raise QuiverError("the lm-eval bridge needs lm-evaluation-harness: "
                      "pip install 'quiver[lm-eval]'") from err

from tqdm import tqdm

from quiver.evaluation.scoring import score_continuations

METHODS = ("base", "arrow", "spectr", "uniform", "centroid", "phatgoose", "expert:NAME")
MODEL_ARGS = ("library", "method", "top_k", "temperature", "gate_steps", "general", "experts",
              "base", "dtype", "max_length", "batch_size", "max_batch_size", "device")
MAX_ROWS = 32  # continuations per forward pass, as the harness's multiple-choice batches
MAX_CONTINUATION_TOKENS = 1024  # rows x width of one pass: bounds its (rows, W, vocab) logits
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own models' default


def _names(value) -> list[str] | None:
    """`a+b` (model_args cannot hold commas) or a list (from JSON model_args)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [n for n in value.split("+") if n]
    return [str(n) for n in value]


class QuiverLM(TemplateLM):
    """A base model with a quiver library's experts attached as `method` routes them.

    From Python, `model` and `tokenizer` may be given loaded (the experts are attached to
    that model; `close()` detaches them).

    Raises:
        QuiverError: an unknown method or argument, a missing library or expert, a library
            for another base model, a multi-task entry.
    """

    def __init__(
        self,
        library: str | None = None,
        method: str | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        gate_steps: int = 100,
        general: str | list[str] | None = None,
        experts: str | list[str] | None = None,
        base: str = "smollm2-135m",
        dtype: str = "auto",
        max_length: int | None = None,
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        device: str | None = None,
        model=None,
        tokenizer=None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise QuiverError(f"unknown quiver model argument(s) {sorted(unknown)}: use "
                              f"{', '.join(MODEL_ARGS)}")
        method = method or ("arrow" if library else "base")
        self.method = method
        self.library_url = str(library) if library else None
        self.general = _names(general)
        self.experts = _names(experts)
        self.batch_size = _batch_size(batch_size)
        library_obj = self._check(method)
        self.base = base if model is None else str(model.config._name_or_path)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's default is cuda:0 even without a GPU; its HF model, too,
            # then takes what there is
        if model is None:
            from quiver.models import load_base

            model, tokenizer = load_base(base, device=device, dtype=dtype)
        elif tokenizer is None:
            raise QuiverError("a loaded model needs its tokenizer (tokenizer=...)")
        self.model, self.tokenizer = model, tokenizer
        self._pad = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                     else tokenizer.eos_token_id)
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length) if max_length else min(limit, 2048)
        self.names = self._attach(library_obj, top_k, temperature, gate_steps)
        self.settings = {"top_k": top_k, "temperature": temperature,
                         "gate_steps": gate_steps if method == "phatgoose" else None}
        self.model.eval()
        self._device = next(self.model.parameters()).device

    # ------------------------------------------------------------------ the model
    def _check(self, method: str):
        """The library, after refusing what cannot run (before the model is loaded)."""
        from quiver.library import Library

        routed = ("arrow", "spectr", "uniform", "centroid", "phatgoose")
        if method not in ("base", *routed) and not method.startswith("expert:"):
            hint = (" (it routes by task, which lm-eval does not tell the model; use quiver "
                    "eval)" if method == "oracle" else "")
            raise QuiverError(f"unknown method {method!r}{hint}: use one of {', '.join(METHODS)}")
        if method == "base":
            if self.library_url or self.general or self.experts:
                raise QuiverError("method 'base' uses no library, experts or general experts")
            return None
        if self.library_url is None:
            raise QuiverError(f"method {method!r} needs a library (model_args library=PATH)")
        if self.general and method != "arrow":
            raise QuiverError("general-knowledge subtraction (general=) works with Arrow only")
        library = Library(self.library_url)
        if method.startswith("expert:"):
            expert = library.get(method.split(":", 1)[1])  # a clear error if it is not there
            if expert.info.kind != "lora":
                raise QuiverError(
                    f"{expert.name!r} is a {expert.info.kind} entry, routed by task: score its "
                    "tasks with quiver eval --method expert:NAME (lm-eval does not tell the "
                    "model which task a request belongs to)")
        for name in (self.experts or []) + (self.general or []):
            library.get(name)
        return library

    def _attach(self, library, top_k, temperature, gate_steps) -> list[str]:
        from quiver.zero_shot import reuse

        if library is None:
            return []
        if self.method.startswith("expert:"):
            names = [self.method.split(":", 1)[1]]
            reuse(self.model, library, method="uniform", experts=names)
            return names
        reuse(self.model, library, method=self.method, experts=self.experts, top_k=top_k,
              temperature=temperature, tokenizer=self.tokenizer, gate_steps=gate_steps,
              general=self.general)
        return list(self.model.quiver_routing.expert_names)

    def close(self) -> None:
        """Detach the experts: the base model is as it was loaded."""
        if self.names:
            from quiver.routing import detach_experts

            detach_experts(self.model)
            self.names = []

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' `config`."""
        return {"quiver_method": self.method, "quiver_library": self.library_url,
                "quiver_experts": list(self.names), "quiver_general": self.general,
                "quiver_base": self.base, "quiver_settings": self.settings}

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Before an empty context: BOS where the tokenizer has one (as lm-eval's HF model
        and quiver's scoring do), else EOS."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """Score `((context, continuation), context_ids, continuation_ids)` requests: those
        with the same context together, the context once, on quiver's batched scoring."""
        groups: dict[tuple[int, ...], list[int]] = {}  # context ids -> request indices
        pairs = []
        for index, (_, context, continuation) in enumerate(requests):
            context, continuation = self._fit(list(context), list(continuation))
            pairs.append((context, continuation))
            groups.setdefault(tuple(context), []).append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = _batches(list(groups.items()), pairs, self.batch_size)
        with tqdm(total=len(requests), disable=disable_tqdm or not requests,
                  desc="quiver loglikelihood") as bar:
            for batch in batches:
                scored = score_continuations(
                    self.model, [list(context) for context, _ in batch],
                    [[pairs[i][1] for i in members] for _, members in batch], self._pad)
                for (_, members), rows in zip(batch, scored, strict=True):
                    for i, (log_prob, greedy) in zip(members, rows, strict=True):
                        results[i] = (log_prob, greedy)
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0],
                                                        results[i])
                    bar.update(len(members))
        return results

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Cut the context's start as lm-eval's HF model does: each predicted token sees at
        most `max_length` tokens (a continuation longer than that loses its first tokens)."""
        whole = (context + continuation)[-(self.max_length + 1) :]
        n = min(len(continuation), len(whole) - 1)
        return whole[: len(whole) - n], whole[len(whole) - n :]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in lm-eval's disjoint rolling windows."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, predicted))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(
                windows, disable_tqdm=disable_tqdm), strict=True):
            totals[owner] += log_prob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched decoding of each context until one of its `until` strings (cut there) or
        the end-of-sequence token; greedy unless `do_sample`."""
        answers: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True, default=str),
                                 []).append(index)
        with tqdm(total=len(requests), disable=disable_tqdm or not requests,
                  desc="quiver generate_until") as bar:
            for members in by_kwargs.values():
                gen_kwargs = copy.deepcopy(requests[members[0]].args[1])
                members = sorted(members, key=lambda i: -len(requests[i].args[0]))
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    texts = self._generate([requests[i].args[0] for i in batch],
                                           copy.deepcopy(gen_kwargs))
                    for i, text in zip(batch, texts, strict=True):
                        answers[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return answers

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if gen_kwargs.get("temperature") == 0.0 and not gen_kwargs.get("do_sample"):
            gen_kwargs.pop("temperature")  # greedy, as lm-eval's HF model reads it
        gen_kwargs.setdefault("do_sample", False)
        keep = max(1, self.max_length - max_new)
        encoded = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for c in contexts]
        width = max(len(ids) for ids in encoded)
        pad = self._pad
        ids = torch.full((len(encoded), width), pad, device=self._device)  # left-padded
        mask = torch.zeros_like(ids)
        for row, row_ids in enumerate(encoded):
            ids[row, width - len(row_ids) :] = torch.tensor(row_ids)
            mask[row, width - len(row_ids) :] = 1
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                  stop_strings=until or None, tokenizer=self.tokenizer,
                                  pad_token_id=pad, **gen_kwargs)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [_cut(text, until) for text in texts]


def _cut(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (lm-eval keeps what precedes it)."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _batch_size(value) -> int:
    """lm-eval's `--batch_size`: a number, or `auto` (quiver's default of 8)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 8
    try:
        size = int(value)
    except (TypeError, ValueError) as err:
        raise QuiverError(f"batch_size must be a number or auto, not {value!r}") from err
    if size < 1:
        raise QuiverError("batch_size must be at least 1")
    return size


def _batches(groups: list, pairs: list, batch_size: int) -> list[list]:
    """Groups `(context ids, request indices)` in batches of similar context length: at most
    `batch_size` contexts, `MAX_ROWS` continuations and `MAX_CONTINUATION_TOKENS` padded
    continuation tokens per batch (a group over those limits runs alone)."""
    groups = sorted(groups, key=lambda g: len(g[0]))
    batches, current, rows, width = [], [], 0, 0
    for context, members in groups:
        longest = max(len(pairs[i][1]) for i in members)
        grown_rows, grown_width = rows + len(members), max(width, longest)
        if current and (len(current) == batch_size or grown_rows > MAX_ROWS
                        or grown_rows * grown_width > MAX_CONTINUATION_TOKENS):
            batches.append(current)
            current, grown_rows, grown_width = [], len(members), longest
        current.append((context, members))
        rows, width = grown_rows, grown_width
    return batches + [current] if current else batches


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...`) with the `quiver` model registered; bad quiver
    input prints one line and exits with 2, as `quiver` does."""
    from lm_eval.__main__ import cli_evaluate
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else list(argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except QuiverError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)
    finally:
        sys.argv = saved


if __name__ == "__main__":  # python -m: register and run the module itself, not __main__
    from quiver.lm_eval_bridge import main as _main

    _main()
else:
    register_model("quiver")(QuiverLM)
