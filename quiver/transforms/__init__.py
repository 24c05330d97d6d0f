"""Data derived from experts: Arrow prototypes, centroids, gates, MBC clusterings, ...
Names are imported on first use (`quiver.lazy`); `config` imports no torch."""

from quiver.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["expert_prototypes", "library_prototypes", "top_right_singular_vector"],
                    "quiver.transforms.arrow"),
    "MBCConfig": "quiver.transforms.config",
    **dict.fromkeys(["Clustering", "cluster_experts"], "quiver.transforms.mbc"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
