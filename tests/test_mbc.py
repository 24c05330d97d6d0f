"""MBC clustering: the pipeline against scikit-learn, recovery of known groups, bad input,
the clusters record in the library, and the plots."""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.preprocessing import normalize

from quiver.config import from_dict, to_dict
from quiver.errors import QuiverError
from quiver.library import Expert, ExpertInfo, Library
from quiver.transforms.mbc import MBCConfig, cluster_experts, expert_embeddings, sparsify

# (module, fan_in, fan_out): deliberately not in sorted order
MODULES = [("model.layers.1.mlp.up_proj", 16, 24), ("model.layers.0.self_attn.q_proj", 16, 16),
           ("model.layers.0.mlp.down_proj", 24, 16)]
RANK = 2


def _width(modules=MODULES, rank=RANK) -> int:
    return sum(rank * fan_in + fan_out * rank for _, fan_in, fan_out in modules)


def _expert(name: str, vector: np.ndarray, modules=MODULES, rank=RANK, task=None) -> Expert:
    """An expert whose parameters, read as the MBC vector (sorted modules, A then B), are
    exactly `vector`: built from the vector, not flattened by the code under test."""
    weights, start = {}, 0
    for module, fan_in, fan_out in sorted(modules):
        for side, shape in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
            size = shape[0] * shape[1]
            chunk = torch.from_numpy(vector[start : start + size].copy()).reshape(shape)
            weights[f"base_model.model.{module}.lora_{side}.weight"] = chunk
            start += size
    assert start == len(vector)
    info = ExpertInfo(name=name, tasks=[task or f"toy:{name}"], base_model="synthetic",
                      base_fingerprint=None, lora={"r": rank})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m, _, _ in modules})}
    return Expert(info, config, weights=weights)


def _groups(n_groups=3, per_group=4, noise=0.05, seed=0):
    """Experts that are a group centre plus small noise, the groups interleaved."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, _width())).astype(np.float32)
    truth = [i % n_groups for i in range(n_groups * per_group)]
    experts = [_expert(f"e{i:02d}", centres[g] + noise * rng.standard_normal(_width())
                       .astype(np.float32)) for i, g in enumerate(truth)]
    return experts, truth


def test_the_pipeline_equals_an_independent_scikit_learn_computation():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((12, _width())).astype(np.float32)  # (E, D), D even
    matrix[:4] += 2 * matrix[0]  # some structure, so k-means has something to find
    matrix[4:8] += 2 * matrix[4]
    experts = [_expert(f"x{i:02d}", row) for i, row in enumerate(matrix)]  # name order
    config = MBCConfig(k=3, seed=0)
    clustering = cluster_experts(experts, config)

    # the reference: mttl's recipe, written independently with numpy and scikit-learn
    sparse = matrix.copy()
    threshold = np.quantile(np.abs(sparse), 0.5, axis=1)
    sparse[np.abs(sparse) <= threshold[:, None]] = 0
    assert np.allclose((sparse == 0).mean(1), 0.5)
    svd = TruncatedSVD(n_components=11, algorithm="randomized", n_iter=5, n_oversamples=10,
                       random_state=0, tol=0.0)
    embeddings = normalize(svd.fit_transform(sparse))
    similarity = cosine_similarity(embeddings)
    labels = KMeans(n_clusters=3, init="k-means++", n_init=10, random_state=0).fit(
        similarity).labels_

    np.testing.assert_allclose(clustering.embeddings, embeddings, atol=1e-5)
    np.testing.assert_allclose(clustering.similarity, similarity, atol=1e-5)
    assert adjusted_rand_score(labels, clustering.labels) == 1.0
    assert clustering.embeddings.shape == (12, 11) and clustering.k == 3


def test_known_groups_are_recovered_and_auto_picks_their_number():
    experts, truth = _groups()
    fixed = cluster_experts(experts, MBCConfig(k=3))
    assert adjusted_rand_score(truth, fixed.labels) == 1.0
    auto = cluster_experts(experts, MBCConfig(k="auto"))
    assert auto.k == 3 and adjusted_rand_score(truth, auto.labels) == 1.0
    assert sorted(auto.silhouette) == list(range(2, 12))  # 2 .. E - 1
    assert max(auto.silhouette.values()) == auto.silhouette[3] > 0.9
    # names are deterministic: numbered by first member, members in input order
    assert auto.clusters == {"cluster0": ["e00", "e03", "e06", "e09"],
                             "cluster1": ["e01", "e04", "e07", "e10"],
                             "cluster2": ["e02", "e05", "e08", "e11"]}
    assert cluster_experts(experts, MBCConfig(k="auto")).clusters == auto.clusters
    capped = cluster_experts(experts, MBCConfig(k="auto", max_k=4))
    assert sorted(capped.silhouette) == [2, 3, 4] and capped.k == 3


def test_agreement_with_known_groups_is_the_adjusted_rand_index():
    experts, truth = _groups()
    clustering = cluster_experts(experts, MBCConfig(k=3))
    families = {n: f"family{t}" for n, t in zip(clustering.names, truth, strict=True)}
    assert clustering.agreement(families) == 1.0
    shuffled = {n: f"family{i % 2}" for i, n in enumerate(clustering.names)}
    assert clustering.agreement(shuffled) == pytest.approx(
        adjusted_rand_score([i % 2 for i in range(12)], clustering.labels))
    assert np.isnan(clustering.agreement({}))  # no expert with a known group


def test_the_partition_does_not_depend_on_the_order_experts_are_listed():
    rng = np.random.default_rng(3)
    experts = [_expert(f"w{i:02d}", rng.standard_normal(_width()).astype(np.float32))
               for i in range(10)]  # no planted structure: k-means++ seeding decides
    listed = cluster_experts(experts, MBCConfig(k=3))
    shuffled = cluster_experts([experts[i] for i in rng.permutation(10)], MBCConfig(k=3))
    as_sets = lambda c: sorted(sorted(m) for m in c.clusters.values())  # noqa: E731
    assert as_sets(listed) == as_sets(shuffled)


def test_the_similarity_matrix_is_cosine_and_the_embedding_unit_norm():
    experts, _ = _groups(per_group=2)
    clustering = cluster_experts(experts, MBCConfig(k=2, dims=3))
    assert clustering.embeddings.shape == (6, 3)
    np.testing.assert_allclose(np.linalg.norm(clustering.embeddings, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(np.diag(clustering.similarity), 1, atol=1e-6)
    np.testing.assert_allclose(clustering.similarity, clustering.similarity.T)


def test_sparsify_zeroes_exactly_the_smallest_fraction():
    vector = np.random.default_rng(0).standard_normal(1001).astype(np.float32)
    original = vector.copy()
    sparse = sparsify(vector.copy(), 0.5)
    assert (sparse == 0).sum() == 500
    kept = np.abs(original[sparse != 0])
    assert kept.min() >= np.abs(original[sparse == 0]).max()
    np.testing.assert_array_equal(sparse[sparse != 0], original[sparse != 0])
    assert np.array_equal(sparsify(vector.copy(), 0.0), original)
    assert (sparsify(vector.copy(), 0.9) == 0).sum() == 900


def test_config_round_trips_through_json_and_parses_k():
    for config in (MBCConfig(k=5, dims=8, sparsity=0.25), MBCConfig(k="auto", max_k=7)):
        assert from_dict(MBCConfig, to_dict(config)) == config
    assert MBCConfig(k="4").k == 4  # the command line passes text
    for bad in ({"k": 0}, {"k": "some"}, {"k": True}, {"k": 2, "sparsity": 1.0},
                {"k": 2, "dims": 0}, {"k": "auto", "max_k": 1}):
        with pytest.raises(QuiverError, match="invalid MBCConfig"):
            from_dict(MBCConfig, bad)


def _mismatched(kind: str) -> list[Expert]:
    experts, _ = _groups(per_group=1)
    if kind == "rank":
        modules, rank = MODULES, 3
    else:
        modules, rank = MODULES[:2], RANK
    width = _width(modules, rank)
    return [*experts, _expert("odd", np.ones(width, np.float32), modules, rank)]


@pytest.mark.parametrize("experts, config, message", [
    (lambda: _groups(per_group=1)[0], MBCConfig(k=4), "k=4 clusters is more than the 3"),
    (lambda: _groups(per_group=1)[0][:1], MBCConfig(k=1), "at least 2 experts, got 1"),
    (lambda: [], MBCConfig(k=1), "at least 2 experts, got 0"),
    (lambda: _groups(per_group=1)[0][:2], MBCConfig(k="auto"), "k=auto needs at least 3"),
    (lambda: _mismatched("rank"), MBCConfig(k=2), "down_proj its A is (3, 24)"),
    (lambda: _mismatched("modules"), MBCConfig(k=2), "it does not adapt"),
    (lambda: [_groups()[0][0]] * 2, MBCConfig(k=2), "listed twice"),
])
def test_bad_input_is_a_clear_error(experts, config, message):
    with pytest.raises(QuiverError) as error:
        cluster_experts(experts(), config)
    assert message in str(error.value)


def test_extreme_k_values():
    experts, _ = _groups(per_group=2)
    one = cluster_experts(experts, MBCConfig(k=1))
    assert one.clusters == {"cluster0": [e.name for e in experts]} and one.silhouette == {}
    each = cluster_experts(experts, MBCConfig(k=len(experts)))
    assert len(each.clusters) == len(experts)
    assert expert_embeddings(experts[:2], MBCConfig(k=1)).shape == (2, 1)


@pytest.mark.parametrize("url", ["local", "memory"])
def test_clusters_record_round_trips_through_the_library(tmp_path, url):
    url = str(tmp_path / "lib") if url == "local" else f"memory://quiver-{uuid.uuid4().hex}"
    library = Library(url, create=True)
    assert library.get_clusters("mbc10") is None and library.cluster_names() == []
    experts, _ = _groups()
    clustering = cluster_experts(experts, MBCConfig(k="auto"))
    library.put_clusters("mbc10", clustering.clusters, clustering.meta())
    clusters, meta = library.get_clusters("mbc10")
    assert clusters == clustering.clusters
    assert meta["config"] == to_dict(clustering.config) and meta["k"] == 3
    assert meta["silhouette"]["3"] == pytest.approx(clustering.silhouette[3])
    np.testing.assert_allclose(meta["similarity"], clustering.similarity, atol=1e-6)
    library.put_clusters("mbc10", {"cluster0": ["a"]}, {})  # replaced, atomically
    assert Library(url).get_clusters("mbc10") == ({"cluster0": ["a"]}, {})
    assert library.cluster_names() == ["mbc10"]


def test_clusters_record_refuses_bad_names_and_shapes(tmp_path):
    library = Library(str(tmp_path / "lib"), create=True)
    with pytest.raises(QuiverError, match="bad clustering name"):
        library.put_clusters("no/slashes", {"c": ["a"]}, {})
    with pytest.raises(QuiverError, match="lists of expert names"):
        library.put_clusters("ok", {"c": "a"}, {})
    (tmp_path / "lib" / "clusters").mkdir()
    (tmp_path / "lib" / "clusters" / "broken.json").write_text("{not json")
    with pytest.raises(QuiverError, match="corrupt clustering record"):
        library.get_clusters("broken")
    assert not (tmp_path / "lib" / "clusters" / "ok.json").exists()


def test_plots_are_written(tmp_path):
    from quiver.report import cluster_heatmap, silhouette_plot

    experts, _ = _groups()
    clustering = cluster_experts(experts, MBCConfig(k="auto"))
    cluster_heatmap(clustering, {n: [f"toy:task {n}"] for n in clustering.names},
                    tmp_path / "h.png")
    cluster_heatmap(clustering, None, tmp_path / "by-family.png",
                    families={n: f"family{i % 2}" for i, n in enumerate(clustering.names)})
    silhouette_plot(clustering.silhouette, clustering.k, tmp_path / "s" / "curve.png")
    assert (tmp_path / "h.png").stat().st_size > 5000
    assert (tmp_path / "by-family.png").stat().st_size > 5000
    assert (tmp_path / "s" / "curve.png").stat().st_size > 5000


def _dense_update(expert: Expert) -> np.ndarray:
    """Every module's update s B A materialised and flattened (sorted modules)."""
    return np.concatenate([(expert.scaling * b @ a).double().reshape(-1).numpy()
                           for _, (a, b) in sorted(expert.lora_factors().items())])


def test_update_space_gram_equals_the_materialised_updates():
    from quiver.transforms.mbc import update_gram

    experts, _ = _groups(n_groups=2, per_group=3)
    dense = np.stack([_dense_update(e) for e in experts])
    assert np.allclose(update_gram(experts), dense @ dense.T, rtol=1e-6, atol=1e-6)
    clustering = cluster_experts(experts, MBCConfig(k=2, space="update"))
    cosine = cosine_similarity(dense)
    # With E - 1 dimensions one direction of the Gram is dropped: close, not exact.
    assert np.abs(clustering.similarity - cosine).max() < 0.2
    assert np.allclose(np.linalg.norm(clustering.embeddings, axis=1), 1.0)


def test_update_space_sees_shared_init_experts_as_different():
    """Experts with one A (a shared initialisation) and unrelated B's: their flattened
    parameters look alike, their updates do not; planted groups in B are found only there."""
    rng = np.random.default_rng(1)
    shared_a = {m: rng.standard_normal((RANK, fan_in)) * 3 for m, fan_in, _ in MODULES}
    centres = [{m: rng.standard_normal((fan_out, RANK)) * 0.1 for m, _, fan_out in MODULES}
               for _ in range(3)]
    experts, truth = [], []
    for i in range(12):
        group = i % 3
        parts = []
        for module, _fan_in, fan_out in sorted(MODULES):
            b = centres[group][module] + 0.01 * rng.standard_normal((fan_out, RANK))
            parts += [shared_a[module].reshape(-1), b.reshape(-1)]
        experts.append(_expert(f"e{i:02d}", np.concatenate(parts).astype(np.float32)))
        truth.append(group)
    params = cluster_experts(experts, MBCConfig(k=3, space="params"))
    update = cluster_experts(experts, MBCConfig(k=3, space="update"))
    off = ~np.eye(12, dtype=bool)
    assert params.similarity[off].min() > update.similarity[off].min()
    assert adjusted_rand_score(truth, update.labels) == 1.0


def test_a_cluster_holding_almost_every_expert_is_reported_degenerate():
    experts, _ = _groups(n_groups=2, per_group=4)
    fine = cluster_experts(experts, MBCConfig(k=2))
    assert fine.degenerate() is None and fine.meta()["degenerate"] is None
    lopsided = dataclasses.replace(fine, clusters={"cluster0": fine.names[:7],
                                                   "cluster1": fine.names[7:]})
    message = lopsided.degenerate()
    assert "cluster0 holds 7 of the 8 experts (88%)" in message
    assert "1 of the 2 clusters hold one expert" in message


def test_unknown_space_is_refused():
    with pytest.raises(ValueError, match="space must be one of"):
        MBCConfig(k=2, space="delta")
