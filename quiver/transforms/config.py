"""How to cluster experts (`MBCConfig`), without torch: the command line reads its fields."""

from __future__ import annotations

from dataclasses import dataclass, field

SPACES = ("params", "update")  # what MBC compares: the flattened (A, B), or the updates s B A


@dataclass
class MBCConfig:
    """How to cluster experts. Defaults follow the paper (docs/design.md: Clustering)."""

    k: int | str = field(metadata={"help": "number of clusters, or 'auto' (best silhouette)"})
    dims: int = field(default=64, metadata={"help": "truncated-SVD dimensions (at most E - 1)"})
    sparsity: float = field(
        default=0.5, metadata={"help": "fraction of each expert's parameters zeroed (smallest)"}
    )
    restarts: int = field(default=10, metadata={"help": "k-means restarts (k-means++ init)"})
    seed: int = field(default=0, metadata={"help": "seed of the SVD and of k-means"})
    max_k: int = field(default=20, metadata={"help": "largest k that k=auto tries"})
    space: str = field(default="params", metadata={
        "help": "what is compared: params (A and B flattened, the paper's) or update (the "
                "updates s B A, what training changed)"})

    def __post_init__(self) -> None:
        if isinstance(self.k, str) and self.k.strip().isdigit():
            self.k = int(self.k)  # the command line passes every k as text
        if self.k != "auto" and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                 or self.k < 1):
            raise ValueError(f"k must be a positive integer or 'auto', not {self.k!r}")
        if self.dims < 1 or self.restarts < 1 or self.max_k < 2:
            raise ValueError("dims and restarts must be positive and max_k at least 2")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), not {self.sparsity}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, not {self.space!r}")
