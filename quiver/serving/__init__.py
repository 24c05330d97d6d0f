"""Using a library: `quiver generate` and an OpenAI-compatible server (`quiver serve`).

Every LoRA expert of a library is attached once (`rows.serve_library`); each batch row
carries its own route (`base`, `arrow`, `uniform`, `expert:NAME`); the engine batches
requests continuously (`engine.Engine`); the server speaks OpenAI's HTTP API (`server`).
"""

from quiver.serving.engine import Engine, EngineConfig, Event, Request
from quiver.serving.rows import Route, RowRoutingContext, ServedModel, serve_library
from quiver.serving.sampling import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "Event",
    "Request",
    "Route",
    "RowRoutingContext",
    "SamplingParams",
    "ServedModel",
    "serve_library",
]
