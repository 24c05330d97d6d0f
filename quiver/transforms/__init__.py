"""Data derived from experts: Arrow prototypes, centroids, gates, MBC clusterings, ..."""

from quiver.transforms.arrow import expert_prototypes, library_prototypes, top_right_singular_vector
from quiver.transforms.mbc import Clustering, MBCConfig, cluster_experts

__all__ = [
    "Clustering",
    "MBCConfig",
    "cluster_experts",
    "expert_prototypes",
    "library_prototypes",
    "top_right_singular_vector",
]
