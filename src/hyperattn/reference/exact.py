"""Exact attention with log-sum-exp, the building block every method is checked against.

Shape legend: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads (``Hq % Hkv == 0``,
``G = Hq // Hkv`` query heads share one KV head), ``Nq``/``Nk`` query/key lengths, ``D``
head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention_lse", "softmax_lse", "merge_lse", "exact_pairs"]

# Score elements materialised at once per (batch, KV head); bounds memory of long rows.
_CHUNK_ELEMENTS = 1 << 24


def softmax_lse(scores: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``softmax(scores) @ v`` and ``logsumexp(scores)``; rows that are all ``-inf`` give 0 and ``-inf``."""
    lse = torch.logsumexp(scores, dim=-1)
    # A row with no visible key has lse = -inf; shifting by 0 keeps its weights at exp(-inf) = 0.
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - shift.unsqueeze(-1))
    return probs @ v, lse


def merge_lse(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two softmax-normalised partial results over disjoint key sets (paper eq. for ``add_self_attentions``)."""
    lse = torch.logaddexp(lse1, lse2)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - shift).unsqueeze(-1)
    w2 = torch.exp(lse2 - shift).unsqueeze(-1)
    return out1 * w1 + out2 * w2, lse


def attention_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Exact attention in fp32.

    ``q: (B, Hq, Nq, D)``, ``k, v: (B, Hkv, Nk, D)``. Causal masking aligns the last query
    with the last key (query ``i`` sees keys ``j <= i + Nk - Nq``), like flash-attn; a
    query that sees no key gets output 0 and lse ``-inf``.

    Returns ``out: (B, Hq, Nq, D)`` fp32 and ``lse: (B, Hq, Nq)`` fp32.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    qg = q.float().reshape(bsz, hkv, group, nq, dim)
    kf = k.float().unsqueeze(2)
    vf = v.float().unsqueeze(2)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, group * nk))
    outs, lses = [], []
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        scores = (qg[:, :, :, start:stop] @ kf.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(start, stop, device=q.device).unsqueeze(1) + (nk - nq)
            cols = torch.arange(nk, device=q.device).unsqueeze(0)
            scores = scores.masked_fill(cols > rows, float("-inf"))
        out, lse = softmax_lse(scores, vf)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(bsz, hq, nq, v.shape[-1])
    lse = torch.cat(lses, dim=3).reshape(bsz, hq, nq)
    return out, lse


def exact_pairs(r0: int, r1: int, nq: int, nk: int, causal: bool) -> float:
    """Scores exact attention computes for query rows ``[r0, r1)`` of one head (closed form)."""
    if r1 <= r0:
        return 0.0
    if not causal:
        return float((r1 - r0) * nk)

    # Row i sees clamp(i + 1 + Nk - Nq, 0, Nk) keys: a clamped arithmetic series.
    def seen_sum(a: int, b: int) -> int:  # sum of clamp(x, 0, nk) for x in [a, b]
        lo, hi = max(a, 1), min(b, nk)
        ramp = (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0
        return ramp + nk * max(0, b - max(a, nk + 1) + 1)

    return float(seen_sum(r0 + nk - nq + 1, r1 + nk - nq))
