"""MBC, model-based clustering: group experts whose LoRA parameters are alike.

Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs"
(ICML 2024, https://arxiv.org/abs/2405.11157), section 3. Tasks whose privately trained
experts end up with similar weights are tasks that transfer to each other; training one
expert per cluster of such tasks gives a better library than one expert per task.

For E experts, each with the same adapted modules and ranks:

    v_e   = concat over modules m in sorted order of [vec(A_e,m), vec(B_e,m)]    (D,)
    v_e  <- v_e with its floor(sparsity * D) smallest |entries| set to 0          (sparsify)
    X     = [v_1; ...; v_E]                                                       (E, D)
    Z     = TruncatedSVD(X, n = min(dims, E - 1))    randomized, seeded           (E, n)
    z_e  <- z_e / ||z_e||_2
    S     = Z Z^T                                     cosine similarities         (E, E)
    labels = KMeans(k, k-means++, restarts, seed) on the rows of S

Each expert is clustered by its row of similarities to every expert, as in the authors'
code (microsoft/mttl, `MBCWithCosSimTransform`).

`space="update"` compares what training changed instead of the raw factors: every A starts
from the same seeded initialisation, so the flattened parameters of experts that learned
different things are still alike (cosine 0.92-0.96 in benchmarks/results/zero_shot_medium.md).
There each expert is the vector of its updates dW_m = s B_m A_m over all modules, and the
Gram matrix of those vectors is computed exactly from the small factors,

    <dW_i, dW_j> = sum_m s_i s_j trace((B_i,m^T B_j,m) (A_j,m A_i,m^T))       (r x r products)

without materialising any dW; the embeddings are its top eigenvectors scaled by the square
roots of their eigenvalues (what the truncated SVD of the vectors gives), L2-normalised.
The sparsification step has no counterpart there (it would need every dW entry).

With `k="auto"`, every k in 2..min(E - 1, max_k) is tried and the one with the best
silhouette score (cosine distance between the embeddings z) wins; ties go to the smaller k.

Experts that do not adapt the same modules with the same shapes cannot be compared
parameter by parameter, so they are refused (`QuiverError`) rather than silently aligned on
a subset of their modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quiver.config import to_dict
from quiver.errors import QuiverError
from quiver.library.expert import Expert, require_lora
from quiver.transforms.config import MBCConfig

METHOD = "mbc"
DEGENERATE_SHARE = 0.75  # a clustering whose largest cluster holds this share of the experts


@dataclass
class Clustering:
    """The result of `cluster_experts`.

    `clusters` maps `cluster0`, `cluster1`, ... to expert names; clusters are numbered by
    their first member's position in `names`, and members keep that order, so the same
    experts in the same order always give the same names. Identical experts can leave
    k-means with fewer than `k` non-empty clusters; only non-empty ones are listed.
    """

    clusters: dict[str, list[str]]
    names: list[str]
    labels: list[int]  # cluster index of each expert in `names`
    similarity: np.ndarray  # (E, E) cosine similarity of the embeddings
    embeddings: np.ndarray  # (E, n) unit vectors
    k: int
    silhouette: dict[int, float]  # k -> silhouette score (every k tried with k="auto")
    config: MBCConfig

    def agreement(self, groups: dict[str, str]) -> float:
        """Adjusted Rand index between the clusters and known groups of the experts (expert
        name -> group, e.g. its task's family): 1 when they are the same partition, about 0
        for clusters no better than chance. Experts without a group are left out; NaN when
        fewer than two have one."""
        from sklearn.metrics import adjusted_rand_score

        known = [i for i, name in enumerate(self.names) if groups.get(name)]
        if len(known) < 2:
            return float("nan")
        return float(adjusted_rand_score([groups[self.names[i]] for i in known],
                                         [self.labels[i] for i in known]))

    def degenerate(self) -> str | None:
        """A one-line warning when one cluster holds almost every expert (at least
        DEGENERATE_SHARE of them with k >= 2): such a library is one expert and a few
        singletons, not clusters of related tasks. None otherwise."""
        sizes = sorted((len(m) for m in self.clusters.values()), reverse=True)
        if len(self.names) < 3 or len(sizes) < 2 or sizes[0] < DEGENERATE_SHARE * len(
                self.names):
            return None
        largest = max(self.clusters, key=lambda c: len(self.clusters[c]))
        singletons = sum(size == 1 for size in sizes)
        return (f"degenerate clustering: {largest} holds {sizes[0]} of the {len(self.names)} "
                f"experts ({100 * sizes[0] / len(self.names):.0f}%); {singletons} of the "
                f"{len(sizes)} clusters hold one expert")

    def meta(self) -> dict:
        """A JSON-ready description (for `Library.put_clusters` and reports)."""
        return {
            "method": METHOD,
            "config": to_dict(self.config),
            "k": self.k,
            "names": list(self.names),
            "labels": list(self.labels),
            "silhouette": {str(k): v for k, v in self.silhouette.items()},
            "similarity": np.round(self.similarity, 6).tolist(),
            "sizes": {name: len(members) for name, members in self.clusters.items()},
            "degenerate": self.degenerate(),
        }


def cluster_experts(experts: list[Expert], config: MBCConfig) -> Clustering:
    """Cluster experts by the similarity of their (sparsified, SVD-reduced) LoRA weights.

    Raises:
        QuiverError: fewer than two experts, k larger than the number of experts, k="auto"
            with fewer than three experts, or experts with different modules or shapes.
    """
    names = [e.name for e in experts]
    require_lora(experts, "MBC clustering")
    _check_counts(names, config)
    # The SVD and k-means++ depend on the rows' order: computing in name order makes the
    # partition the same however the experts are listed (a build and `quiver cluster` agree).
    order = sorted(range(len(names)), key=names.__getitem__)
    back = np.argsort(order)  # position of each input expert in name order
    embeddings = expert_embeddings([experts[i] for i in order], config)  # (E, n)
    similarity = np.clip(embeddings @ embeddings.T, -1.0, 1.0)  # (E, E)
    if config.k == "auto":
        candidates = range(2, min(len(names) - 1, config.max_k) + 1)
        tried = {k: _kmeans(similarity, k, config) for k in candidates}
        silhouette = {k: _silhouette(embeddings, labels) for k, labels in tried.items()}
        k = max(silhouette, key=lambda c: (silhouette[c], -c))  # ties: the smaller k
        labels = tried[k]
    else:
        k = config.k
        labels = _kmeans(similarity, k, config)
        silhouette = {k: _silhouette(embeddings, labels)} if 2 <= k < len(names) else {}
    embeddings, similarity = embeddings[back], similarity[np.ix_(back, back)]  # input order
    labels = _renumber(np.asarray(labels)[back])
    clusters: dict[str, list[str]] = {}
    for name, label in zip(names, labels, strict=True):
        clusters.setdefault(f"cluster{label}", []).append(name)
    return Clustering(clusters, names, labels, similarity, embeddings, k, silhouette, config)


def expert_embeddings(experts: list[Expert], config: MBCConfig) -> np.ndarray:
    """Unit-norm truncated-SVD embeddings `(E, min(dims, E - 1))` of the sparsified experts.

    Raises:
        QuiverError: experts with different adapted modules or shapes.
    """
    from sklearn.decomposition import TruncatedSVD  # imported here: sklearn loads slowly
    from sklearn.preprocessing import normalize

    if not experts:
        raise QuiverError("no experts to embed")
    if config.space == "update":
        return update_embeddings(experts, config)
    layout = _layout(experts[0])
    width = sum(int(np.prod(a)) + int(np.prod(b)) for a, b in layout.values())
    matrix = np.empty((len(experts), width), dtype=np.float32)  # (E, D)
    for row, expert in enumerate(experts):
        _check_same_layout(experts[0], expert, layout)
        matrix[row] = sparsify(expert_vector(expert), config.sparsity)
        expert.drop_weights()  # a large library never holds every expert's weights twice
    components = max(1, min(config.dims, len(experts) - 1, width - 1))
    svd = TruncatedSVD(n_components=components, algorithm="randomized", n_iter=5,
                       n_oversamples=10, random_state=config.seed, tol=0.0)
    return normalize(svd.fit_transform(matrix))  # (E, n)


def update_embeddings(experts: list[Expert], config: MBCConfig) -> np.ndarray:
    """Unit-norm embeddings `(E, min(dims, E - 1))` of the experts' update vectors, from
    their exact Gram matrix (module docstring)."""
    layout = _layout(experts[0])
    for expert in experts:
        _check_same_layout(experts[0], expert, layout)
    gram = update_gram(experts)
    values, vectors = np.linalg.eigh(gram)  # ascending
    components = max(1, min(config.dims, len(experts) - 1))
    top = np.argsort(values)[::-1][:components]
    embeddings = vectors[:, top] * np.sqrt(np.clip(values[top], 0.0, None))  # (E, n)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms > 0, norms, 1.0)


def update_gram(experts: list[Expert]) -> np.ndarray:
    """`(E, E)` inner products <dW_i, dW_j> of the experts' updates over every module,
    dW = s B A, from the factors alone: sum_m s_i s_j trace((B_i^T B_j) (A_j A_i^T))."""
    scalings = torch.tensor([e.scaling for e in experts], dtype=torch.float64)
    factors = [e.lora_factors() for e in experts]
    gram = torch.zeros(len(experts), len(experts), dtype=torch.float64)
    for module in sorted(factors[0]):
        a = torch.stack([f[module][0] for f in factors]).double()  # (E, r, in)
        b = torch.stack([f[module][1] for f in factors]).double()  # (E, out, r)
        bb = torch.einsum("iok,jol->ijkl", b, b)  # (E, E, r, r): B_i^T B_j
        aa = torch.einsum("ikn,jln->ijkl", a, a)  # (E, E, r, r): A_i A_j^T
        gram += (bb * aa).sum((2, 3))  # trace((B_i^T B_j)(A_j A_i^T)), elementwise
    for expert in experts:
        expert.drop_weights()
    return (gram * scalings[:, None] * scalings[None, :]).numpy()


def expert_vector(expert: Expert) -> np.ndarray:
    """Every LoRA parameter of an expert in one float32 vector: per module (sorted by name),
    A flattened, then B flattened."""
    parts = []
    for _, (a, b) in sorted(expert.lora_factors().items()):
        parts += [a.detach().float().reshape(-1), b.detach().float().reshape(-1)]
    return np.concatenate([p.cpu().numpy() for p in parts])  # (D,)


def sparsify(vector: np.ndarray, fraction: float) -> np.ndarray:
    """Zero the `floor(fraction * len(vector))` entries of smallest magnitude, in place."""
    drop = int(fraction * vector.size)
    if drop > 0:
        smallest = np.argpartition(np.abs(vector), drop - 1)[:drop]
        vector[smallest] = 0
    return vector


# ------------------------------------------------------------------------- helpers
def _check_counts(names: list[str], config: MBCConfig) -> None:
    if len(names) < 2:
        raise QuiverError(f"clustering needs at least 2 experts, got {len(names)}")
    if len(set(names)) != len(names):
        raise QuiverError("the same expert is listed twice")
    if config.k == "auto" and len(names) < 3:
        raise QuiverError("k=auto needs at least 3 experts (silhouette scores need 2 <= k < E)")
    if config.k != "auto" and config.k > len(names):
        raise QuiverError(f"k={config.k} clusters is more than the {len(names)} experts")


def _layout(expert: Expert) -> dict[str, tuple[tuple, tuple]]:
    """`{module: (shape of A, shape of B)}`, sorted by module."""
    return {m: (tuple(a.shape), tuple(b.shape)) for m, (a, b) in sorted(
        expert.lora_factors().items())}


def _check_same_layout(first: Expert, other: Expert, layout: dict) -> None:
    """Refuse an expert whose parameters do not line up with the first expert's."""
    factors = other.lora_factors()
    why = ""
    if set(factors) != set(layout):
        extra, missing = sorted(set(factors) - set(layout)), sorted(set(layout) - set(factors))
        why = f"it adapts {extra[:3]} too" if extra else f"it does not adapt {missing[:3]}"
    else:
        for module, (a, b) in layout.items():
            other_a, other_b = (tuple(t.shape) for t in factors[module])
            if (other_a, other_b) != (a, b):
                why = f"at {module} its A is {other_a} and B {other_b}, not {a} and {b}"
                break
    if why:
        raise QuiverError(
            f"experts {first.name!r} and {other.name!r} cannot be compared parameter by "
            f"parameter: {why} (MBC needs the same target modules and ranks)"
        )


def _kmeans(similarity: np.ndarray, k: int, config: MBCConfig) -> np.ndarray:
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=k, init="k-means++", n_init=config.restarts,
                    random_state=config.seed)
    return kmeans.fit(similarity).labels_


def _silhouette(embeddings: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    if not 2 <= len(set(labels.tolist())) < len(labels):
        return -1.0  # k-means merged clusters (identical experts): the worst possible score
    return float(silhouette_score(embeddings, labels, metric="cosine"))


def _renumber(labels: np.ndarray) -> list[int]:
    """Number clusters by the position of their first member (k-means' own order is not)."""
    order: dict[int, int] = {}
    for label in labels.tolist():
        order.setdefault(label, len(order))
    return [order[label] for label in labels.tolist()]
