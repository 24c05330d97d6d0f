"""The server's settings (a light module: the CLI reads its fields without loading the server)."""

from __future__ import annotations

from dataclasses import dataclass, field

from quiver.errors import QuiverError


@dataclass
class ServeConfig:
    """Where the server listens and what it accepts."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind (0.0.0.0 exposes the server to the network)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    max_prompt_tokens: int = field(default=2048, metadata={
        "help": "longest prompt accepted, in tokens"})
    max_tokens: int = field(default=512, metadata={
        "help": "largest max_tokens a request may ask for"})
    max_concurrent: int = field(default=64, metadata={
        "help": "requests accepted at once (running or queued); more are answered 429"})
    max_batch: int = field(default=32, metadata={
        "help": "requests generated together in one forward pass"})
    top_k: int = field(default=4, metadata={"help": "Arrow: experts per token"})
    arrow_temperature: float = field(default=1.0, metadata={
        "help": "Arrow: softmax temperature of the routing"})
    max_body_bytes: int = field(default=1_000_000, metadata={
        "help": "largest request body accepted"})

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_concurrent", "max_batch",
                     "top_k", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise QuiverError(f"{name} must be at least 1")
