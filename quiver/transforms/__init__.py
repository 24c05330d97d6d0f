"""Data derived from experts and stored in the library: Arrow prototypes, ..."""

from quiver.transforms.arrow import expert_prototypes, library_prototypes, top_right_singular_vector

__all__ = ["expert_prototypes", "library_prototypes", "top_right_singular_vector"]
