"""Angular LSH with Gray-code bucket order (sortLSH, paper §3 / Alg. 1).

``r`` random hyperplanes give each vector an ``r``-bit sign pattern. Buckets are ranked
by the pattern's position in the reflected Gray code, so buckets adjacent in the sorted
order differ in exactly one hyperplane and hold nearby directions. (The authors' code
indexes the Gray sequence *by* the pattern instead of inverting it, which loses that
adjacency for r >= 3; we rank by the inverse.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["draw_projections", "gray_rank", "lsh_buckets"]


def draw_projections(head_dim: int, num_projs: int, generator: torch.Generator) -> Tensor:
    """Gaussian hyperplanes ``P ~ N(0, 1)^(D x r)``, fp32 on the generator's device."""
    return torch.randn(head_dim, num_projs, generator=generator, device=generator.device)


def gray_rank(pattern: Tensor, bits: int | None = None) -> Tensor:
    """Position of each bit pattern in the reflected Gray sequence ``g(i) = i ^ (i >> 1)``.

    ``bits``: patterns are below ``2**bits`` (a fixed number of steps, no host sync);
    ``None``: run until no bit is left.
    """
    rank = pattern.clone()
    shift = pattern >> 1
    if bits is not None:
        for _ in range(bits - 1):
            rank ^= shift
            shift = shift >> 1
        return rank
    while bool((shift != 0).any()):
        rank ^= shift
        shift = shift >> 1
    return rank


def lsh_buckets(x: Tensor, proj: Tensor) -> Tensor:
    """Bucket ranks ``(...)`` int64 of vectors ``x: (..., D)`` under hyperplanes ``proj: (D, r)``."""
    bits = (x.float() @ proj.to(x.device)) > 0
    weights = 2 ** torch.arange(proj.shape[1], device=x.device)
    return gray_rank((bits.long() * weights).sum(-1), proj.shape[1])
