"""Using a library: `quiver generate` and an OpenAI-compatible server (`quiver serve`).

Every LoRA expert of a library is attached once (`rows.serve_library`); each batch row
carries its own route (`base`, `arrow`, `uniform`, `expert:NAME`); the engine batches
requests continuously (`engine.Engine`); the server speaks OpenAI's HTTP API (`server`).
Names are imported on first use (`quiver.lazy`); `config` imports no torch.
"""

from quiver.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["Engine", "EngineConfig", "Event", "Request"], "quiver.serving.engine"),
    **dict.fromkeys(["Route", "RowRoutingContext", "ServedModel", "serve_library"],
                    "quiver.serving.rows"),
    "SamplingParams": "quiver.serving.sampling",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
