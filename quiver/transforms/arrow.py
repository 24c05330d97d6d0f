"""Arrow prototypes: the top right singular vector of each expert's update, per layer.

Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs"
(ICML 2024), section 4. For a LoRA update dW = B A (B: out x r, A: r x in) the prototype is
the unit vector p (length `in`) that dW stretches most: the top right singular vector.

Exact and cheap, from the small factors only, in O((in + out) r^2):

    A^T = Qa Ra,  B = Qb Rb                  (thin QR)
    Rb Ra^T = U S V^T                        (SVD of an r x r matrix)
    dW = Qb (Rb Ra^T) Qa^T = (Qb U) S (Qa V)^T,   so   p = Qa V[:, 0]

PEFT instead runs 15 power iterations from a random start, which is inexact when the top two
singular values are close. The sign of p is arbitrary; Arrow routes on |x . p|.
"""

from __future__ import annotations

import torch

from quiver.library import Library

KIND = "arrow-prototypes"


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of B @ A (A: (r, in), B: (out, r)), computed in float64.

    Works for any factorisation, so a sum of updates can be passed as concatenated factors.
    """
    a64, b64 = a.detach().double(), b.detach().double()
    qa, ra = torch.linalg.qr(a64.T)  # (in, r), (r, r)
    qb, rb = torch.linalg.qr(b64)  # (out, r), (r, r)
    _, _, vh = torch.linalg.svd(rb @ ra.T)  # (r, r)
    return (qa @ vh[0]).to(a.dtype)  # (in,)


def expert_prototypes(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """`{module: prototype (in,)}` for one expert's `{module: (A, B)}`."""
    return {module: top_right_singular_vector(a, b) for module, (a, b) in factors.items()}


def library_prototypes(library: Library, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Prototypes of each named expert, computed once and stored in the library.

    An expert's prototypes are derived data keyed by its content hash, so adding an expert
    computes only its own, and a changed expert never reuses stale ones.
    """
    return {name: stored_prototypes(library, name) for name in names}


def stored_prototypes(library: Library, name: str) -> dict[str, torch.Tensor]:
    """One expert's prototypes from the library, computed and stored first if missing."""
    return library.derived(name, KIND, {"method": "qr-svd"},
                           lambda: expert_prototypes(library.get(name).lora_factors()))
