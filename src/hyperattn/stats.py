"""What one attention call did (a leaf module: imported by the methods and the public API)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["AttentionStats"]


@dataclass(frozen=True)
class AttentionStats:
    """What one call did.

    Attributes:
        method: the method that ran.
        keys_per_query: average number of keys scored per query over the whole call
            (exact parts, probes, guard trials and samples included); exact causal
            attention at ``N`` scores ``(N + 1) / 2``.
        est_error: ``(B, Hq)`` fp32 estimate of each head's relative output error
            ``||O - O_exact|| / ||O_exact||`` from its probe rows (root mean square over the
            head's chunks); 0 for exact heads, NaN where the method makes no estimate
            (``"hyper"``).
        exact_heads: ``(B, Hq)`` bool, heads computed exactly throughout (by the guard or
            because every row is below ``min_seq_len``).
        exact_chunks: ``(B, Hq, C)`` bool, the chunks of ``chunk`` rows the guard sent to
            exact attention (structured method; ``None`` for the others).
    """

    method: str
    keys_per_query: float
    est_error: Tensor
    exact_heads: Tensor
    exact_chunks: Tensor | None = None
