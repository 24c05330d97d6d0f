import pytest
import torch
from peft import PeftModel

import quiver
from quiver.errors import QuiverError
from quiver.merging import merge_experts

from .conftest import new_library
from .test_routing import _synthetic_peft_folders

MODULE = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def three_experts(tiny, tmp_path_factory):
    model, _ = tiny
    root = tmp_path_factory.mktemp("merge")
    folders = _synthetic_peft_folders(model, root, n=3)
    library = new_library(root / "lib", model)
    for i, folder in enumerate(folders):
        library.import_peft(str(folder), f"e{i}")
    return library, folders


def _peft_merge(folders, combination, weights, **kwargs):
    base, _ = quiver.load_base("tiny-llama", device="cpu")
    peft_model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="e0")
    for i, folder in enumerate(folders[1:], start=1):
        peft_model.load_adapter(str(folder), adapter_name=f"e{i}")
    names = [f"e{i}" for i in range(len(folders))]
    peft_model.add_weighted_adapter(names, weights, "merged", combination_type=combination,
                                    **kwargs)
    layer = peft_model.base_model.model.get_submodule(MODULE)
    return layer.get_delta_weight("merged"), layer.scaling["merged"]


def _our_delta(expert):
    a, b = expert.lora_factors()[MODULE]
    return expert.scaling * b @ a


def _dense(library, name):
    expert = library.get(name)
    a, b = expert.lora_factors()[MODULE]
    return expert.scaling * b @ a


def test_uniform_matches_peft_linear(three_experts):
    library, folders = three_experts
    merged, _ = merge_experts(library.experts(), "uniform", "u")
    # PEFT's linear merge: A = sum sqrt(w s) A_e, B = sum sqrt(w s) B_e, at scaling 1; with
    # w = 1 / E^2 that is s * mean(B) mean(A), our definition
    expected, s_new = _peft_merge(folders, "linear", [1 / 9] * 3)
    assert s_new == 1.0
    torch.testing.assert_close(_our_delta(merged), expected, rtol=1e-4, atol=1e-5)


def test_uniform_delta_is_the_exact_mean_update_and_matches_peft_svd(three_experts):
    library, folders = three_experts
    merged, report = merge_experts(library.experts(), "uniform-delta", "ud")
    mean = sum(_dense(library, f"e{i}") for i in range(3)) / 3
    torch.testing.assert_close(_our_delta(merged), mean, rtol=1e-4, atol=1e-5)
    assert report["rank"] == 12 and report["max_relative_error"] == 0.0
    # PEFT sums w_e * dW_e (scaling included), keeps the top svd_rank, at scaling 1
    expected, scaling = _peft_merge(folders, "svd", [1 / 3] * 3, svd_rank=12)
    assert scaling == 1.0
    torch.testing.assert_close(_our_delta(merged), expected, rtol=1e-4, atol=1e-5)


def test_truncation_reports_the_svd_error(three_experts):
    library, _ = three_experts
    merged, report = merge_experts(library.experts(), "uniform-delta", "ud2", rank=2)
    mean = sum(_dense(library, f"e{i}") for i in range(3)) / 3
    s = torch.linalg.svdvals(mean.double())
    expected_error = (s[2:].pow(2).sum() / s.pow(2).sum()).sqrt().item()
    assert report["relative_error"][MODULE] == pytest.approx(expected_error, rel=1e-6)
    assert report["rank"] == 2 and 0 < report["max_relative_error"] < 1
    residual = (mean - _our_delta(merged)).norm() / mean.norm()
    assert residual.item() == pytest.approx(expected_error, rel=1e-4)


def test_ties_matches_peft_ties_svd(three_experts):
    library, folders = three_experts
    merged, _ = merge_experts(library.experts(), "ties", "t", density=0.2, rank=64)
    expected, _ = _peft_merge(folders, "ties_svd", [1.0] * 3, density=0.2,
                                  majority_sign_method="total", svd_rank=64)
    torch.testing.assert_close(_our_delta(merged), expected, rtol=1e-3, atol=1e-5)


def test_task_arithmetic_is_the_scaled_sum(three_experts):
    library, folders = three_experts
    merged, _ = merge_experts(library.experts(), "task-arithmetic", "ta", scale=0.5)
    total = sum(_dense(library, f"e{i}") for i in range(3))
    torch.testing.assert_close(_our_delta(merged), 0.5 * total, rtol=1e-4, atol=1e-5)
    expected, _ = _peft_merge(folders, "svd", [0.5] * 3, svd_rank=12)
    torch.testing.assert_close(_our_delta(merged), expected, rtol=1e-4, atol=1e-5)


def test_merged_expert_is_stored_and_exportable(three_experts, tmp_path):
    library, _ = three_experts
    merged, _ = merge_experts(library.experts(), "ties", "ties-merge")
    library.add(merged)
    stored = library.get("ties-merge")
    assert stored.info.source == "merge:ties" and stored.adapter_config["r"] == 12
    library.export_peft("ties-merge", str(tmp_path / "out"))
    base, _ = quiver.load_base("tiny-llama", device="cpu")
    PeftModel.from_pretrained(base, str(tmp_path / "out"))  # loads
    library.remove("ties-merge")


def test_bad_merges_are_refused(three_experts, tiny_library):
    library, _ = three_experts
    with pytest.raises(QuiverError, match="unknown merge method"):
        merge_experts(library.experts(), "average-ish", "x")
    mixed = library.experts() + [tiny_library.get("alpha")]
    with pytest.raises(QuiverError, match="one rank and one module set"):
        merge_experts(mixed, "uniform", "x")
