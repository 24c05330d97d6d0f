"""Low-rank helpers shared by the merges: exact factor concatenation and truncated SVD."""

from __future__ import annotations

import torch


def svd_factorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors (A (rank, in), B (out, rank)) of a dense update, and the
    relative Frobenius error ||delta - B A|| / ||delta|| of the truncation."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.shape[0])
    a, b = vh[:rank], u[:, :rank] * s[:rank]
    total = s.pow(2).sum()
    error = (s[rank:].pow(2).sum() / total).sqrt().item() if total > 0 else 0.0
    return a.to(delta.dtype), b.to(delta.dtype), error


def lowrank_factorise(
    a: torch.Tensor, b: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncate B A (given as factors, possibly of high rank) to `rank` without forming it.

    QR of A^T and of B, SVD of the small core: the same numbers as `svd_factorise(B @ A)`
    at O((in + out) R^2) instead of O(in * out * min(in, out)).
    """
    if a.shape[0] <= rank:
        return a, b, 0.0
    qa, ra = torch.linalg.qr(a.double().T)  # (in, R), (R, R)
    qb, rb = torch.linalg.qr(b.double())  # (out, R), (R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # (R, R)
    new_a = (vh[:rank] @ qa.T).to(a.dtype)  # (rank, in)
    new_b = (qb @ u[:, :rank] * s[:rank]).to(b.dtype)  # (out, rank)
    total = s.pow(2).sum()
    error = (s[rank:].pow(2).sum() / total).sqrt().item() if total > 0 else 0.0
    return new_a, new_b, error
