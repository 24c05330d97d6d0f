"""Adapters the training loop trains, one method per module (as PEFT's `tuners/<method>/`):

- `lora`: a LoRA through PEFT (the library's plain experts);
- `poly_mhr`: Poly and MHR, skills routed per task; `mtl_lora`: MTL-LoRA;
- `task_rows`: what the multi-task ones share (a row of parameters per training task);
- `config`: the multi-task configs; `registry`: their kinds by name; `protocol`: what the
  training loop needs of any adapter.

Names are imported on first use (`quiver.lazy`), so the configs load without torch.
"""

from quiver.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["MTLLoRAConfig", "PolyMHRConfig"], "quiver.adapters.config"),
    **dict.fromkeys(["ADAPTERS", "STRATEGIES", "AdapterConfig", "adapter_for_strategy",
                     "adapter_from_dict", "adapter_to_dict", "load_adapter"],
                    "quiver.adapters.registry"),
    **dict.fromkeys(["MTLLoRAAdapter", "MTLLoRALinear", "attach_mtl_lora", "load_mtl_lora",
                     "task_lora"], "quiver.adapters.mtl_lora"),
    **dict.fromkeys(["PolyAdapter", "PolyLinear", "attach_poly", "load_poly",
                     "routing_weights"], "quiver.adapters.poly_mhr"),
    "TaskRowAdapter": "quiver.adapters.task_rows",
    "LoraAdapter": "quiver.adapters.lora",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
