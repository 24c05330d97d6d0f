"""SpectR routing (Fleshman and Van Durme, "SpectR: Dynamically Composing LM Experts with
Spectral Routing", 2025): Arrow with each expert's whole spectrum.

Arrow scores a token x by its overlap with the top right singular vector of an expert's
update dW = s B A. SpectR uses every singular direction, weighted by its singular value:
with dW = U S V^T,

    logit_e = || S V^T x || / T = || dW x || / T = || s B (A x) || / T,   top k,   softmax

(U is orthonormal, so the norm is the length of the expert's own update of x: large when x
lies in the directions the expert changes most). Computed exactly from the factors, never
forming dW: h = A x (r numbers per expert), then ||s B h||^2 = h^T G h with the r x r Gram
matrix G = (s B)^T (s B), made once per layer. Cost per token t * E * r * (in + r), against
Arrow's t * E * in. Defaults T = 1 and k = 4, as quiver's Arrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpectrRouter:
    top_k: int = 4
    temperature: float = 1.0
    reads_factors = True  # the routed layer passes its stacked A and the Grams of s*B

    def __call__(self, x: torch.Tensor, a_stack: torch.Tensor, grams: torch.Tensor):
        """x (t, in), a_stack (E, R, in), grams (E, R, R) -> (weights (t, k), indices)."""
        n_experts, rank, fan_in = a_stack.shape
        h = (x @ a_stack.reshape(n_experts * rank, fan_in).T).view(-1, n_experts, rank)
        squared = torch.einsum("ter,ers,tes->te", h, grams, h)  # ||s B A x||^2 (t, E)
        logits = squared.clamp(min=0).sqrt()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        top = logits.topk(min(self.top_k, n_experts), dim=-1)
        return torch.softmax(top.values, dim=-1), top.indices


def update_grams(b_rows: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E, R, R) Gram matrices (s B)^T (s B) of a layer's stacked s*B rows (E*R, out)."""
    b = b_rows.view(n_experts, -1, b_rows.shape[-1])  # (E, R, out)
    return b @ b.transpose(1, 2)
