"""The compatibility matrix: tiny random models of twelve architectures through every step.

Each architecture is built offline from transformers' own config class (hidden 64, 2 layers,
SmolLM2's tokenizer), saved as a checkpoint folder and loaded by path, as a user's model is.
For each: train with the default targets (all-linear) -> library -> PEFT round trip ->
Arrow and uniform evaluation -> MBC -> merge -> Poly and MTL-LoRA -> generate (against
`model.generate`) and one `serve` request. README.md's table of supported architectures is
this file's outcome.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time

import pytest
import torch
import transformers

from quiver.adapters import MTLLoRAConfig, PolyMHRConfig
from quiver.data import load_task
from quiver.library import Library
from quiver.merging import merge_experts
from quiver.models import (
    fingerprint,
    linear_module_shapes,
    load_base,
    load_tokenizer,
    model_targets,
)
from quiver.training import TrainConfig, train_expert
from tests.conftest import random_lora

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128}
WINDOW = 6  # sliding windows shorter than the long prompt below
ARCHITECTURES = {  # name: (config class, its arguments beyond SMALL)
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": WINDOW}),
    "phi": ("PhiConfig", {}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 2, "sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 16,
                                "sliding_window": WINDOW}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "falcon": ("FalconConfig", {}),
    "mixtral": ("MixtralConfig", {"num_key_value_heads": 2, "num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_key_value_heads": 2, "num_experts": 4,
                                     "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 64}),
}
TASKS = ["gym:basic_arithmetic?size=24", "gym:spell_backward?size=24"]
QUICK = TrainConfig(steps=2, eval_every=2, batch_size=2, rank=2, max_length=64, lr=1e-2)
LONG_PROMPT = "one two three four five six seven eight nine ten eleven twelve"


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory):
    """(name, checkpoint folder, model, tokenizer, library with random experts r0..r2)."""
    name = request.param
    class_name, extra = ARCHITECTURES[name]
    tokenizer = load_tokenizer("tiny-llama")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    config = getattr(transformers, class_name)(**{**SMALL, **extra, **ids},
                                               vocab_size=len(tokenizer))
    folder = tmp_path_factory.mktemp(name) / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, tokenizer = load_base(str(folder), device="cpu", dtype="fp32")
    library = Library(str(folder.parent / "library"), create=True)
    library.ensure_base(str(folder), fingerprint(model), linear_module_shapes(model))
    generator = torch.Generator().manual_seed(0)
    targets = list(model_targets(model, "all-linear"))
    for i in range(3):
        expert = random_lora(f"r{i}", model, generator, targets, scale=0.2)
        expert.info.base_model = str(folder)
        library.add(expert)
    return name, folder, model, tokenizer, library


def test_training_with_default_targets_adapts_every_linear_layer(arch, caplog):
    name, _, model, tokenizer, library = arch
    with caplog.at_level(logging.WARNING, logger="quiver"):
        expert, result = train_expert(model, tokenizer, [load_task(TASKS[0])], "trained", QUICK,
                                      show_progress=False)
    assert sorted(expert.adapter_config["target_modules"]) == sorted(
        model_targets(model, "all-linear"))
    assert math.isfinite(result.best_valid_loss)
    moe = name in ("mixtral", "qwen2_moe")
    assert ("left out: model.layers.*.mlp.experts" in caplog.text) == moe  # said, not silent
    library.add(expert, overwrite=True)


def test_peft_round_trip_gives_peft_s_own_outputs(arch, tmp_path):
    from peft import PeftModel

    from quiver.routing import detach_experts
    from quiver.zero_shot import reuse

    _, _, model, tokenizer, library = arch
    ids = tokenizer(LONG_PROMPT, return_tensors="pt").input_ids
    library.export_peft("r0", str(tmp_path / "peft"))
    with torch.no_grad():
        base = model(ids).logits
        reuse(model, library, method="uniform", experts=["r0"])
        try:
            ours = model(ids).logits
        finally:
            detach_experts(model)
        peft_model = PeftModel.from_pretrained(model, str(tmp_path / "peft"))
        theirs = peft_model(ids).logits
        peft_model.unload()
    assert (ours - base).abs().max() > 1e-3  # the expert changes the outputs
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    again = library.import_peft(str(tmp_path / "peft"), "r0-again", tasks=["toy:r0"])
    for key, value in library.get("r0").weights.items():
        torch.testing.assert_close(again.weights[key], value, atol=0, rtol=0)
    library.remove("r0-again")


@pytest.mark.parametrize("method", ["arrow", "uniform"])
def test_arrow_and_uniform_evaluate(arch, method):
    from quiver.evaluation import EvalConfig, evaluate
    from quiver.routing import detach_experts
    from quiver.zero_shot import reuse

    _, _, model, tokenizer, library = arch
    reuse(model, library, method=method, experts=["r0", "r1", "r2"], tokenizer=tokenizer)
    try:
        report = evaluate(model, tokenizer, [load_task(TASKS[1])], EvalConfig(limit=2),
                          show_progress=False)
    finally:
        detach_experts(model)
    (scores,) = report["tasks"].values()
    assert scores["examples"] == 2 and math.isfinite(scores["answer_loglik"])


def test_mbc_and_merge(arch):
    from quiver.routing import detach_experts
    from quiver.transforms.mbc import MBCConfig, cluster_experts
    from quiver.zero_shot import reuse

    _, _, model, tokenizer, library = arch
    clustering = cluster_experts(library.experts(["r0", "r1", "r2"]), MBCConfig(k=2, dims=2))
    assert sorted(set(clustering.labels)) == [0, 1]
    merged, _ = merge_experts(library.experts(["r0", "r1"]), "uniform-delta", "avg")
    merged.info.base_model = library.base["name"]
    library.add(merged, overwrite=True)
    ids = tokenizer(LONG_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        outputs = []
        for experts in (["avg"], ["r0", "r1"]):  # the exact mean update: uniform routing
            reuse(model, library, method="uniform", experts=experts)
            try:
                outputs.append(model(ids).logits)
            finally:
                detach_experts(model)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("adapter", [PolyMHRConfig(skills=2, heads=1), MTLLoRAConfig()],
                         ids=["poly", "mtl-lora"])
def test_poly_and_mtl_lora_train(arch, adapter):
    _, _, model, tokenizer, _ = arch
    tasks = [load_task(t) for t in TASKS]
    expert, result = train_expert(model, tokenizer, tasks, "joint", QUICK, show_progress=False,
                                  adapter=adapter)
    assert math.isfinite(result.best_valid_loss)
    assert sorted(expert.adapter_config["target_modules"]) == sorted(
        model_targets(model, "all-linear"))


def test_generate_matches_model_generate_and_serve_answers(arch):
    from quiver.routing import detach_experts
    from quiver.serving import Engine, SamplingParams, serve_library
    from quiver.zero_shot import reuse

    name, folder, _, tokenizer, library = arch
    model, _ = load_base(str(folder), device="cpu", dtype="fp32")  # its own, experts attached
    served = serve_library(model, tokenizer, library)
    prompts = ["Hi", LONG_PROMPT]  # shorter and longer than the sliding windows
    engine = Engine(served).start()
    try:
        events = engine.generate([(tokenizer(p).input_ids, served.route(route),
                                   SamplingParams(max_new_tokens=8))
                                  for route in ("base", "expert:r1") for p in prompts])
    finally:
        engine.stop()
    reference, _ = load_base(str(folder), device="cpu", dtype="fp32")
    expected = []
    for expert in (None, "r1"):
        if expert:
            reuse(reference, library, method="uniform", experts=[expert])
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = reference.generate(ids, max_new_tokens=8, do_sample=False,
                                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
            expected.append(out[0, ids.shape[1]:].tolist())
        if expert:
            detach_experts(reference)
    assert [[e.token for e in got] for got in events] == expected, name
    text = _serve_once(served, {"model": "expert:r1", "prompt": LONG_PROMPT, "max_tokens": 8,
                                "temperature": 0})
    assert text == tokenizer.decode(expected[3], skip_special_tokens=True)


def _serve_once(served, body: dict) -> str:
    """One completion from `quiver serve`'s app under uvicorn on 127.0.0.1."""
    import socket

    import uvicorn

    from quiver.serving.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        return answer["choices"][0]["text"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
