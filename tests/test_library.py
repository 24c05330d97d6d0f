import ast
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from quiver.errors import QuiverError
from quiver.library import Expert, ExpertInfo, Library
from quiver.library import storage as storage_module
from quiver.models import load_base

from .conftest import new_library


def _copy_library_with(tiny_library, tmp_path, name="alpha"):
    """A fresh library holding a copy of one expert of the shared fixture."""
    library = Library(str(tmp_path / "copy"), create=True)
    base = tiny_library.base
    library.ensure_base(base["name"], base["fingerprint"], base["modules"])
    library.add(tiny_library.get(name))
    return library


def test_names_get_and_metadata(tiny_library):
    assert tiny_library.names() == ["alpha", "beta"]
    assert "alpha" in tiny_library and "gamma" not in tiny_library
    expert = tiny_library.get("alpha")
    assert expert.info.tasks == ["toy:alpha"] and expert.info.base_model == "tiny-llama"
    assert expert.info.content_hash and expert.info.created
    assert expert.info.training["rank"] == 4 and "best_valid_loss" in expert.info.metrics


def test_listing_reads_no_weights(tiny_library, tmp_path):
    library = _copy_library_with(tiny_library, tmp_path)
    weights = tmp_path / "copy" / "experts" / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(b"garbage")  # listing and metadata must not touch this file
    assert library.names() == ["alpha"]
    expert = library.get("alpha")
    assert expert.info.name == "alpha"
    with pytest.raises(QuiverError, match="corrupt"):
        _ = expert.weights


def test_corrupt_metadata_is_a_clear_error(tiny_library, tmp_path):
    library = _copy_library_with(tiny_library, tmp_path)
    (tmp_path / "copy" / "experts" / "alpha" / "quiver.json").write_text("{not json")
    with pytest.raises(QuiverError, match="corrupt expert metadata"):
        library.get("alpha")


def test_missing_library_is_a_clear_error(tmp_path):
    with pytest.raises(QuiverError, match="no library at"):
        Library(str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()


def test_export_loads_in_peft_with_the_same_outputs(tiny, tiny_library, tmp_path):
    model, tokenizer = tiny
    tiny_library.export_peft("alpha", str(tmp_path / "peft"))
    ids = tokenizer("Repeat: apple 3\nAnswer:", return_tensors="pt").input_ids
    base_model, _ = load_base("tiny-llama", device="cpu")
    peft_model = PeftModel.from_pretrained(base_model, str(tmp_path / "peft"))
    peft_logits = peft_model(ids).logits
    # reference: fold W + s * B A into a fresh copy of the base model by hand
    merged, _ = load_base("tiny-llama", device="cpu")
    expert = tiny_library.get("alpha")
    with torch.no_grad():
        for module, (a, b) in expert.lora_factors().items():
            merged.get_submodule(module).weight += expert.scaling * b @ a
    torch.testing.assert_close(peft_logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(peft_logits, model(ids).logits, atol=1e-4)  # it does something
    with pytest.raises(QuiverError, match="not empty"):
        tiny_library.export_peft("alpha", str(tmp_path / "peft"))


def _peft_folder(path, r=4, hidden=64, init=False, targets=("q_proj", "v_proj")):
    """A PEFT LoRA folder saved by PEFT itself for a tiny Llama of the given width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=r, target_modules=list(targets), init_lora_weights=init))
    model.save_pretrained(str(path))
    return path


def test_import_peft_keeps_weights_and_roundtrips(tiny_library, tmp_path):
    library = _copy_library_with(tiny_library, tmp_path)
    folder = _peft_folder(tmp_path / "adapter")
    expert = library.import_peft(str(folder), "imported", tasks=["toy:x"])
    from safetensors.torch import load_file

    original = load_file(str(folder / "adapter_model.safetensors"))
    stored = library.get("imported").weights
    assert set(stored) == set(original)
    for key in original:
        assert torch.equal(stored[key], original[key])
    assert expert.info.source.startswith("peft:") and expert.info.tasks == ["toy:x"]
    library.export_peft("imported", str(tmp_path / "again"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_import_refuses_pickled_adapters(tiny_library, tmp_path):
    library = _copy_library_with(tiny_library, tmp_path)
    folder = _peft_folder(tmp_path / "adapter")
    os.rename(folder / "adapter_model.safetensors", folder / "adapter_model.bin")
    with pytest.raises(QuiverError, match="never unpickles"):
        library.import_peft(str(folder), "pickled")
    assert library.names() == ["alpha"]


@pytest.mark.parametrize("damage, message", [
    ("rank", "rank mismatch"),
    ("targets", "target-module mismatch"),
    ("width", "shape mismatch"),
    ("corrupt", "corrupt safetensors"),
    ("config", "corrupt adapter_config"),
    ("dora", "not supported"),
    ("nan", "NaN or infinite"),
])
def test_import_refuses_bad_adapters_and_writes_nothing(tiny_library, tmp_path, damage, message):
    library = _copy_library_with(tiny_library, tmp_path)
    folder = _peft_folder(tmp_path / "adapter", hidden=96 if damage == "width" else 64)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if damage == "rank":
        config["r"] = 8
    elif damage == "targets":
        config["target_modules"] = ["k_proj"]
    elif damage == "dora":
        config["use_dora"] = True
    config_path.write_text(json.dumps(config))
    if damage == "corrupt":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    if damage == "config":
        config_path.write_text("{")
    if damage == "nan":  # one NaN would reach every mixture that holds this expert
        weights = load_file(folder / "adapter_model.safetensors")
        next(iter(weights.values()))[0, 0] = float("nan")
        save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(QuiverError, match=message):
        library.import_peft(str(folder), "bad")
    assert library.names() == ["alpha"]
    assert not (tmp_path / "copy" / "experts" / "bad").exists()


def test_an_expert_for_another_base_model_is_refused(tiny_library, tmp_path):
    library = _copy_library_with(tiny_library, tmp_path)
    expert = tiny_library.get("beta")
    info = ExpertInfo(**{**expert.info.__dict__, "base_fingerprint": "0123456789abcdef",
                         "base_model": "other-model"})
    with pytest.raises(QuiverError, match="library .* is for 'tiny-llama'"):
        library.add(Expert(info, expert.adapter_config, weights=expert.weights))
    with pytest.raises(QuiverError, match="holds experts for base model"):
        library.ensure_base("other-model", "0123456789abcdef", {})
    assert library.names() == ["alpha"]


def test_remove_and_rename(tiny_library, tmp_path):
    library = _copy_library_with(tiny_library, tmp_path)
    library.put_derived("alpha", "proto", {"k": 1}, {"p": torch.ones(3)}, {"note": "x"})
    library.rename("alpha", "first")
    assert library.names() == ["first"] and library.get("first").info.name == "first"
    tensors, meta = library.get_derived("first", "proto", {"k": 1})
    assert torch.equal(tensors["p"], torch.ones(3)) and meta == {"note": "x"}
    with pytest.raises(QuiverError, match="no expert named"):
        library.rename("alpha", "again")
    library.remove("first")
    assert library.names() == []
    with pytest.raises(QuiverError, match="no expert named"):
        library.remove("first")


def test_derived_data_is_keyed_by_config(tiny_library, tmp_path):
    library = _copy_library_with(tiny_library, tmp_path)
    library.put_derived("alpha", "arrow", {"top": 1}, {"v": torch.arange(4.0)}, {})
    assert library.get_derived("alpha", "arrow", {"top": 2}) is None
    assert library.get_derived("alpha", "other", {"top": 1}) is None
    tensors, _ = library.get_derived("alpha", "arrow", {"top": 1})
    assert torch.equal(tensors["v"], torch.arange(4.0))


def test_bad_names_and_duplicates_are_refused(tiny_library, tmp_path):
    library = _copy_library_with(tiny_library, tmp_path)
    expert = tiny_library.get("beta")
    for bad in ["", "a/b", "../x", ".hidden"]:
        info = ExpertInfo(**{**expert.info.__dict__, "name": bad})
        with pytest.raises(QuiverError, match="bad expert name"):
            library.add(Expert(info, expert.adapter_config, weights=expert.weights))
    with pytest.raises(QuiverError, match="already exists"):
        library.add(tiny_library.get("alpha"))


def test_an_interrupted_add_leaves_nothing(tiny_library, tmp_path, monkeypatch):
    library = _copy_library_with(tiny_library, tmp_path)
    calls = []
    real_write = storage_module._write_synced

    def fail_on_second_file(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_write(path, data)

    monkeypatch.setattr(storage_module, "_write_synced", fail_on_second_file)
    with pytest.raises(OSError):
        library.add(tiny_library.get("beta"))
    monkeypatch.undo()
    assert library.names() == ["alpha"]
    assert not (tmp_path / "copy" / "experts" / "beta").exists()
    assert list((tmp_path / "copy" / "tmp").iterdir()) == []
    library.add(tiny_library.get("beta"))  # and a retry works
    assert library.names() == ["alpha", "beta"]


def _add_copies(url, source_dir, prefix, count):
    library = Library(url)
    source = Library(source_dir)
    expert = source.get("alpha")
    for i in range(count):
        info = ExpertInfo(**{**expert.info.__dict__, "name": f"{prefix}{i}"})
        library.add(Expert(info, expert.adapter_config, weights=expert.weights))


def test_two_processes_adding_at_once_both_land(tiny_library, tmp_path):
    library = _copy_library_with(tiny_library, tmp_path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_copies,
                               args=(library.url, tiny_library.url, prefix, 5))
               for prefix in ("p", "q")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert library.names() == sorted(["alpha"] + [f"p{i}" for i in range(5)]
                                     + [f"q{i}" for i in range(5)])
    assert all(torch.equal(library.get(f"q{i}").weights[k], v)
               for i in range(5) for k, v in library.get("alpha").weights.items())


def test_nothing_in_the_package_can_unpickle():
    import pathlib

    import quiver

    root = pathlib.Path(quiver.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        forbidden = ["import " + "pickle", "torch." + "load(", "job" + "lib"]
        assert not any(word in text for word in forbidden), path


_ABOVE_LIBRARY = ("quiver.adapters", "quiver.adaptation", "quiver.training")  # import library
_IMPORT_LIBRARY = f"""
import importlib.util, sys, types
package = types.ModuleType("quiver")  # quiver/__init__ imports training and more: skip it
package.__path__ = list(importlib.util.find_spec("quiver").submodule_search_locations)
sys.modules["quiver"] = package
import quiver.library
from quiver.errors import QuiverError
from quiver.library import store
for peft_type in ("POLY", "MTL_LORA"):  # the checks of the multi-task formats run too
    try:
        store.check_adapter({{"peft_type": peft_type}}, {{}}, None)
    except QuiverError:
        pass
print([m for m in sys.modules if m.startswith({_ABOVE_LIBRARY!r})])
"""


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Every module an `import` anywhere in `tree` (functions included) names; relative
    imports resolved against `package`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] if node.level else [])
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_library_package_imports_no_adapter_module():
    """Data flows one way: the adapters (and adaptation, training) import the library, the
    library never imports them, not even inside a function."""
    found = subprocess.run([sys.executable, "-c", _IMPORT_LIBRARY], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert found == "[]", found
    root = Path(__file__).parent.parent / "quiver" / "library"
    for path in sorted(root.rglob("*.py")):
        package = ".".join(("quiver", "library", *path.relative_to(root).parent.parts))
        imported = _imported_modules(ast.parse(path.read_text()), package)
        above = sorted(m for m in imported
                       if any(m == p or m.startswith(p + ".") for p in _ABOVE_LIBRARY))
        assert not above, f"{path.name} imports {above}"


def test_library_base_pin(tiny, tmp_path):
    library = new_library(tmp_path / "lib", tiny[0])
    assert library.base["name"] == "tiny-llama"
    assert library.base["modules"]["model.layers.0.mlp.up_proj"] == [64, 128]
