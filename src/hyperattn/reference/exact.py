"""Exact attention with log-sum-exp, the building block every method is checked against.

Shape legend: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads (``Hq % Hkv == 0``,
``G = Hq // Hkv`` query heads share one KV head), ``Nq``/``Nk`` query/key lengths, ``D``
head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention_lse", "softmax_lse", "merge_lse", "exact_pairs", "compute_dtype"]

# Score elements materialised at once per (batch, KV head); bounds memory of long rows.
_CHUNK_ELEMENTS = 1 << 24


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the references compute in: fp32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_total(top: Tensor, total: Tensor) -> Tensor:
    # log(total) + top, and -inf where total == 0. The inner where keeps log's argument
    # positive, so an empty row passes a zero gradient instead of 0 * inf = NaN.
    present = total > 0
    return torch.where(present, top + torch.log(torch.where(present, total, torch.ones_like(total))),
                       torch.full_like(total, float("-inf")))


def softmax_lse(scores: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``softmax(scores) @ v`` and ``logsumexp(scores)``; rows that are all ``-inf`` give 0 and ``-inf``.

    Differentiable everywhere the result is finite, empty rows included (their gradient is
    0): ``torch.logsumexp`` of an all ``-inf`` row back-propagates ``exp(-inf - -inf)`` = NaN.
    """
    # The shift cancels exactly in out and lse, so it is a constant for autograd.
    top = scores.detach().amax(dim=-1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top.unsqueeze(-1))
    total = weights.sum(-1)
    out = (weights @ v) / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return out, _log_total(top, total)


def merge_lse(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two softmax-normalised partial results over disjoint key sets (paper eq. for ``add_self_attentions``).

    Parts with ``lse = -inf`` (no key) get weight 0, with a zero gradient (no NaN).
    """
    top = torch.maximum(lse1, lse2).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w1, w2 = torch.exp(lse1 - top), torch.exp(lse2 - top)
    total = w1 + w2
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = out1 * (w1 / safe).unsqueeze(-1) + out2 * (w2 / safe).unsqueeze(-1)
    return out, _log_total(top, total)


def attention_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Exact attention in fp32 (float64 for float64 inputs).

    ``q: (B, Hq, Nq, D)``, ``k, v: (B, Hkv, Nk, D)``. Causal masking aligns the last query
    with the last key (query ``i`` sees keys ``j <= i + Nk - Nq``), like flash-attn; a
    query that sees no key gets output 0 and lse ``-inf``.

    Returns ``out: (B, Hq, Nq, D)`` and ``lse: (B, Hq, Nq)`` in :func:`compute_dtype`.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    dtype = compute_dtype(q)
    qg = q.to(dtype).reshape(bsz, hkv, group, nq, dim)
    kf = k.to(dtype).unsqueeze(2)
    vf = v.to(dtype).unsqueeze(2)
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
