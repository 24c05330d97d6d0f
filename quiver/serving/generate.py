"""`quiver generate`: one completion from a library, a single expert, or the bare base model.

It runs on the serving engine (a batch of one), so the command line and the server produce
the same tokens for the same request and seed.
"""

from __future__ import annotations

from quiver.errors import QuiverError
from quiver.library import Library
from quiver.models import library_base, load_base
from quiver.serving.engine import Engine
from quiver.serving.rows import ServedModel, serve_library
from quiver.serving.sampling import SamplingParams


def load_served(library_url: str | None, base: str | None = None, dtype: str = "auto",
                top_k: int = 4, temperature: float = 1.0) -> ServedModel:
    """The base model (the library's own unless `base` names one) with every LoRA expert of
    the library attached for serving; the bare base model without a library.

    Raises:
        QuiverError: the library or the base model cannot be read, or do not match.
    """
    library = Library(library_url) if library_url else None
    model, tokenizer = load_base(library_base(library_url, base), dtype=dtype)
    return serve_library(model, tokenizer, library, top_k, temperature)


def model_name(method: str, expert: str | None) -> str:
    """The served name of a CLI choice: `expert:NAME`, or the method (base, arrow, uniform)."""
    return f"expert:{expert}" if expert else method


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt; with `chat`, as the user's message in the tokenizer's chat
    template, followed by the assistant's turn.

    Raises:
        QuiverError: `chat` with a tokenizer that has no chat template.
    """
    if not chat:
        return tokenizer(prompt).input_ids
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}])


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ready for the reply.

    Raises:
        QuiverError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise QuiverError("this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def stop_ids(served: ServedModel) -> frozenset[int]:
    """The tokens that end a generation: the tokenizer's and the model's end-of-sequence."""
    ids = {served.tokenizer.eos_token_id}
    configured = served.model.generation_config.eos_token_id
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return frozenset(i for i in ids if i is not None)


def generate_text(served: ServedModel, prompt: str, name: str = "base",
                  sampling: SamplingParams | None = None, chat: bool = False) -> str:
    """The completion of `prompt` by the served model `name` (base, arrow, uniform,
    expert:NAME).

    Raises:
        QuiverError: an unknown name, or a generation that failed.
    """
    route = served.route(name)
    ids = prompt_ids(served.tokenizer, prompt, chat)
    sampling = sampling or SamplingParams()
    engine = Engine(served).start()
    try:
        (events,) = engine.generate([(ids, route, sampling)], stop_ids(served))
    finally:
        engine.stop()
    if events[-1].finish == "error":
        raise QuiverError(f"generation failed: {events[-1].error}")
    tokens = [e.token for e in events if e.token is not None]
    return served.tokenizer.decode(tokens, skip_special_tokens=True)
