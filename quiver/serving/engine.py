"""The generation engine: continuous batching of requests that name different experts.

One engine thread owns the model. Requests are queued by any thread (`Engine.submit`) and
their tokens come back through the callback each request carries. Every step of the loop:

1. admits queued requests while the batch has room (`max_batch` rows), dropping those
   cancelled meanwhile, and removes the rows whose request was cancelled (a client that
   disconnected frees its row at the next step);
2. decodes one token for every row already in the batch: a single forward pass over (B, 1)
   tokens with the KV cache, each row routed its own way (`quiver.serving.rows`);
3. prefills the newcomers together: their prompts left-padded to the longest one, in a fresh
   KV cache (one more forward pass), which gives each its first token;
4. drops the rows that finished (a stop token or their token budget) from both caches and
   merges the newcomers' cache into the batch's.

Layout of the batch (B rows, a cache of L positions): each row's real tokens are
right-aligned, with padding on the left; `mask` (B, L) is 1 on real positions. A row's
position ids count only its real tokens, so padding changes neither its rotary positions nor,
being masked, its attention: every row computes what it would compute alone. Merging two
caches pads the shorter one on the left (keys are cached after their rotary embedding, so
moving them to other slots changes nothing), and columns that are padding in every row are
cut, so the cache stays as long as its longest row. Every layer keeps its whole history
(`DynamicLayer`), sliding-window layers too (Mistral, Phi-3, Gemma-2's local layers): the
model's own mask applies the window, from distances between cache slots, and a row's real
tokens are contiguous in its slots, so those distances are its tokens' distances. Chunked
and other attention kinds, whose masks depend on absolute positions, are refused in one line.

Why prefill separately rather than in the decode pass: a row's prompt and another row's
single next token have different lengths, and a padded (B, prompt) pass would compute every
decoding row's padding. Two passes in a step with newcomers, one otherwise.

One request never fails another. A row whose sampling raises, or whose logits are not finite
(a broken expert, an overflow), ends alone with an "error" event. A forward pass that raises
is undone (the layers it had appended to are cut back) and repeated one row at a time, so
only the rows that fail alone fail; the others go on from the same cache and compute what
they would have computed anyway. Only an error outside the forward passes (the engine's own
bookkeeping) fails the whole batch.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from quiver.errors import QuiverError
from quiver.serving.rows import Route, ServedModel
from quiver.serving.sampling import Sampler, SamplingParams


@dataclass
class EngineConfig:
    """Limits of the engine's batch."""

    max_batch: int = field(default=32, metadata={
        "help": "requests decoded together in one forward pass (the others wait in a queue)"})
    max_prefill_tokens: int = field(default=8192, metadata={
        "help": "padded prompt tokens prefilled together in one pass at most"})

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_prefill_tokens < 1:
            raise QuiverError("max_batch and max_prefill_tokens must be at least 1")


class Event(NamedTuple):
    """What the engine tells a request: a new token, and/or that it finished and why
    ("stop", "length", "cancelled" or "error"), with the error message when there is one.
    `logits` (vocab,) come with the token when the request asked to keep them."""

    token: int | None = None
    finish: str | None = None
    error: str | None = None
    logits: torch.Tensor | None = None


@dataclass(eq=False)
class Request:
    """One generation: token ids in, events out (`emit` is called on the engine thread)."""

    prompt_ids: list[int]
    route: Route
    sampling: SamplingParams
    emit: Callable[[Event], None]
    stop_ids: frozenset[int] = frozenset()
    keep_logits: bool = False
    cancelled: bool = False


@dataclass(eq=False)
class _Row:
    request: Request
    sampler: Sampler
    length: int  # real tokens in the cache
    next_token: int = -1  # sampled, not yet in the cache
    generated: int = 0
    finished: bool = False


class Engine:
    """Continuous batching over a `ServedModel`; start it, submit requests, stop it."""

    def __init__(self, served: ServedModel, config: EngineConfig | None = None) -> None:
        check_attention(served.model.config)
        self.served = served
        self.config = config or EngineConfig()
        self._pending: deque[Request] = deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L) 1 on real tokens
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # forward passes so far (decode and prefill)
        self.max_rows_seen = 0

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="quiver-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> Request:
        """Queue a request; its events arrive through `request.emit`."""
        with self._wake:
            if self._stopping:
                raise QuiverError("the engine is stopped")
            self._pending.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request: it leaves the queue or the batch before the next step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def load(self) -> dict[str, int]:
        """Rows in the batch and requests waiting for one."""
        return {"running": len(self._rows), "queued": len(self._pending)}

    def generate(self, requests: list[tuple[list[int], Route, SamplingParams]],
                 stop_ids: frozenset[int] = frozenset(),
                 keep_logits: bool = False) -> list[list[Event]]:
        """Run requests to the end (submitted together) and return each one's events."""
        events: list[list[Event]] = [[] for _ in requests]
        done: queue.Queue[int] = queue.Queue()

        def collect(index):
            def emit(event: Event) -> None:
                events[index].append(event)
                if event.finish is not None:
                    done.put(index)
            return emit

        for index, (ids, route, sampling) in enumerate(requests):
            self.submit(Request(ids, route, sampling, collect(index), stop_ids, keep_logits))
        for _ in requests:
            done.get()
        return events

    # ----------------------------------------------------------------- the engine thread
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._pending and not self._rows:
                        self._wake.wait()
                    if self._stopping:
                        break
                    joiners = self._admit()
                self._drop_cancelled()
                try:
                    self._step(joiners)
                except Exception as err:  # the engine's own bug: fail the batch, serve on
                    message = _describe(err)
                    for request in [r.request for r in self._rows] + joiners:
                        request.emit(Event(finish="error", error=message))
                    self._rows, self._cache, self._mask = [], None, None
        for request in [r.request for r in self._rows] + list(self._pending):
            request.emit(Event(finish="cancelled"))

    def _admit(self) -> list[Request]:
        """Queued requests that fit in the batch now (called holding the lock)."""
        joiners, padded = [], 0
        while self._pending and len(self._rows) + len(joiners) < self.config.max_batch:
            request = self._pending[0]
            if request.cancelled:
                self._pending.popleft().emit(Event(finish="cancelled"))
                continue
            longest = max([len(request.prompt_ids)] + [len(j.prompt_ids) for j in joiners])
            padded = longest * (len(joiners) + 1)
            if joiners and padded > self.config.max_prefill_tokens:
                break
            joiners.append(self._pending.popleft())
        return joiners

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.request.cancelled]
        for row in self._rows:
            if row.request.cancelled:
                row.request.emit(Event(finish="cancelled"))
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._select(keep)

    def _step(self, joiners: list[Request]) -> None:
        if self._rows:
            self._sample(self._rows, *self._decode())
            self._select([i for i, row in enumerate(self._rows) if not row.finished])
            self._rows = [row for row in self._rows if not row.finished]
        for group, (cache, mask, logits) in self._prefill_isolated(joiners):
            rows = [_Row(r, Sampler(r.sampling), len(r.prompt_ids)) for r in group]
            self._sample(rows, logits, {})
            keep = [i for i, row in enumerate(rows) if not row.finished]
            self._merge([rows[i] for i in keep], cache, mask, keep)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    def _forward(self, ids, mask, positions, cache, routes: list[Route]) -> torch.Tensor:
        """One pass over (B, T) tokens; the last position's logits (B, vocab)."""
        if self.served.context is not None:
            self.served.context.set_rows(routes, ids.shape[1])
        out = self.served.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                cache=cache, use_cache=True, logits_to_keep=1)
        self.steps += 1
        return out.logits[:, -1]

    def _decode(self) -> tuple[torch.Tensor, dict[int, str]]:
        """One token for every row: (logits (B, vocab), {row: error} for rows that failed)."""
        device = self._device()
        ids = torch.tensor([[row.next_token] for row in self._rows], device=device)  # (B, 1)
        positions = torch.tensor([[row.length] for row in self._rows], device=device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], 1)
        routes = [row.request.route for row in self._rows]
        length = self._mask.shape[1]
        try:
            logits, errors = self._forward(ids, mask, positions, self._cache, routes), {}
        except Exception:  # one row's fault, perhaps: undo the pass, then a row at a time
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
            logits, errors = self._decode_rows(ids, mask, positions, routes)
        self._mask = mask
        for row in self._rows:
            row.length += 1
        return logits, errors

    def _decode_rows(self, ids, mask, positions, routes):
        """The decode pass one row at a time, from the same cache; a failed row's logits and
        cached column are zeros (the row leaves the batch after sampling)."""
        batch = [(layer.keys, layer.values) for layer in self._cache.layers]
        columns, logits, errors = [], [], {}
        for i in range(len(routes)):
            for layer, (keys, values) in zip(self._cache.layers, batch, strict=True):
                layer.keys, layer.values = keys[i : i + 1], values[i : i + 1]
            try:
                logits.append(self._forward(ids[i : i + 1], mask[i : i + 1],
                                            positions[i : i + 1], self._cache, [routes[i]])[0])
                columns.append([(layer.keys[..., -1:, :], layer.values[..., -1:, :])
                                for layer in self._cache.layers])
            except Exception as err:
                errors[i] = _describe(err)
                logits.append(None)
                columns.append(None)
        for n, (layer, (keys, values)) in enumerate(zip(self._cache.layers, batch, strict=True)):
            zeros = torch.zeros_like(keys[:1, ..., :1, :])
            layer.keys = torch.cat([keys, torch.cat(
                [zeros if c is None else c[n][0] for c in columns])], -2)
            layer.values = torch.cat([values, torch.cat(
                [zeros if c is None else c[n][1] for c in columns])], -2)
        done = [x for x in logits if x is not None]
        blank = torch.zeros_like(done[0]) if done else torch.zeros(1)
        return torch.stack([blank if x is None else x for x in logits]), errors

    def _prefill_isolated(self, joiners: list[Request]):
        """(requests, (cache, mask, logits)) groups for the newcomers: all together, or, when
        that pass raises, each alone; a request whose own prefill raises ends with an error."""
        if not joiners:
            return []
        try:
            return [(joiners, self._prefill(joiners))]
        except Exception as err:
            if len(joiners) == 1:
                joiners[0].emit(Event(finish="error", error=_describe(err)))
                return []
        groups = []
        for request in joiners:
            try:
                groups.append(([request], self._prefill([request])))
            except Exception as err:
                request.emit(Event(finish="error", error=_describe(err)))
        return groups

    def _prefill(self, joiners: list[Request]):
        """A fresh cache for the newcomers' prompts (left-padded), and their next logits."""
        device, pad = self._device(), self.served.tokenizer.pad_token_id or 0
        longest = max(len(r.prompt_ids) for r in joiners)
        ids = torch.full((len(joiners), longest), pad, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(joiners), longest, dtype=torch.long)
        for i, request in enumerate(joiners):
            ids[i, longest - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[i, longest - len(request.prompt_ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens count from 0
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        cache = DynamicCache()  # whole-history layers everywhere: the mask applies any window
        logits = self._forward(ids, mask, positions, cache, [r.route for r in joiners])
        if cache.get_seq_length() == 0:  # an older transformers that names it past_key_values
            raise QuiverError("this transformers version does not take the KV cache as `cache`: "
                              "serving needs a newer transformers (5.24 works)")
        return cache, mask, logits

    def _sample(self, rows: list[_Row], logits: torch.Tensor, errors: dict[int, str]) -> None:
        """Pick each row's next token, tell its request, and mark finished rows. A row that
        failed in the forward pass, whose logits are not finite or whose sampling raises
        finishes alone with an error."""
        finite = torch.isfinite(logits).all(-1).tolist()  # (B,)
        for i, (row, row_logits) in enumerate(zip(rows, logits, strict=True)):
            request = row.request
            try:
                if i in errors:
                    raise _RowError(errors[i])
                if not finite[i]:
                    raise _RowError("the model computed NaN or infinite logits for this request")
                token = row.sampler(row_logits)
            except Exception as err:
                row.finished = True
                request.emit(Event(finish="error", error=_describe(err)))
                continue
            row.generated += 1
            kept = row_logits.clone() if request.keep_logits else None
            if token in request.stop_ids:
                row.finished = True
                request.emit(Event(finish="stop", logits=kept))
                continue
            row.next_token = token
            row.finished = row.generated >= request.sampling.max_new_tokens
            request.emit(Event(token, "length" if row.finished else None, logits=kept))

    # ----------------------------------------------------------------- the batch's cache
    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep` of the cache and mask, and cut all-padding columns."""
        if not keep:
            self._cache, self._mask = None, None
            return
        if self._cache is None or len(keep) == self._mask.shape[0]:
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._mask = self._mask[index]
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self._trim()

    def _trim(self) -> None:
        first = int(self._mask.any(0).nonzero()[0])  # the first column any row uses
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor,
               keep: list[int]) -> None:
        """Append the newcomers `rows` (rows `keep` of `cache` and `mask`) to the batch."""
        if not rows:
            return
        index = torch.tensor(keep, device=mask.device)
        mask = mask[index]
        new = [(layer.keys[index], layer.values[index]) for layer in cache.layers]
        if self._cache is None:
            self._cache, self._mask = cache, mask
            for layer, (keys, values) in zip(cache.layers, new, strict=True):
                layer.keys, layer.values = keys, values
        else:
            length = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([_left_pad(self._mask, length), _left_pad(mask, length)])
            for layer, (keys, values) in zip(self._cache.layers, new, strict=True):
                layer.keys = torch.cat([_left_pad(layer.keys, length, -2),
                                        _left_pad(keys, length, -2)])
                layer.values = torch.cat([_left_pad(layer.values, length, -2),
                                          _left_pad(values, length, -2)])
        self._rows += rows
        self._trim()

    def _device(self) -> torch.device:
        return next(self.served.model.parameters()).device


SERVED_ATTENTION = ("full_attention", "sliding_attention")


def check_attention(config) -> None:
    """Refuse models with attention kinds the engine's batch layout cannot hold.

    Raises:
        QuiverError: a layer of another kind (chunked, linear, compressed, ...).
    """
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    other = sorted(set(layer_types) - set(SERVED_ATTENTION) - {"dummy"})
    if other:
        raise QuiverError(f"serving needs full or sliding-window attention; this model has "
                          f"{', '.join(other)} layers")


class _RowError(Exception):
    """A failure of one row, already described."""


def _describe(err: Exception) -> str:
    return str(err) if isinstance(err, _RowError) else f"{err.__class__.__name__}: {err}"


def _left_pad(tensor: torch.Tensor, length: int, dim: int = -1) -> torch.Tensor:
    """`tensor` zero-padded on the left of `dim` to `length`."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)
