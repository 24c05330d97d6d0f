"""lib-mu: the library's average as the starting point of one LoRA, fine-tuned.

Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"
(ICML), https://arxiv.org/abs/2405.11157 (their µ; MHR-µ of Caccia et al. 2023 does the same
with a Poly entry's skills). What is averaged: the *factors*, A's and scaled B's separately,

    A_0 = mean_e A_e,   B_0 = mean_e s_e B_e,   update at the start = B_0 A_0

(`quiver.merging.uniform`), not the updates B_e A_e. Why: the fine-tuned LoRA keeps the
experts' rank r, so it trains as many parameters as `private` does (a fair comparison), and
it starts exactly where polylib's near-uniform router starts, so lib-mu and polylib-full
differ only by the router. The average of the updates (`uniform-delta`) would be exact but of
rank E r; cut back to r by an SVD it is no longer the average either. Note that
mean(B) mean(A) != mean(B A): with experts trained from different random A's the factor
average is a smaller update than any expert's, a start rather than a merge.
"""

from __future__ import annotations

from quiver.adaptation.starts import Factors
from quiver.merging import merge_experts


def lib_mu_factors(experts) -> Factors:
    """`{module: (mean A, mean s B)}` of LoRA experts of one rank and one set of layers.

    Raises:
        QuiverError: no experts, or experts the uniform merge cannot average.
    """
    merged, _ = merge_experts(experts, "uniform", "lib-mu")  # scaling 1: s_e inside B
    return merged.lora_factors()
