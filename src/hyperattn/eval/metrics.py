"""Error and perplexity metrics of the measurement protocol (DESIGN.md §5).

Shape legend: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads, ``N`` tokens,
``R`` evaluated query rows, ``D`` head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["relative_error", "exact_rows", "token_nll", "perplexity", "topk_recall"]


def relative_error(out: Tensor, ref: Tensor) -> Tensor:
    """Per-head ``||out - ref||_F / ||ref||_F`` over rows and head dim: ``(B, Hq)`` fp32.

    ``out, ref: (B, Hq, R, D)``.

    Examples::

        >>> ref = torch.ones(1, 2, 4, 8)
        >>> relative_error(ref * 1.1, ref)
        tensor([[0.1000, 0.1000]])
    """
    diff = (out.float() - ref.float()).pow(2).sum((-1, -2))
    return (diff / ref.float().pow(2).sum((-1, -2)).clamp(min=torch.finfo(torch.float32).tiny)).sqrt()


def exact_rows(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, rows: Tensor) -> Tensor:
    """Exact attention output ``(B, Hq, R, D)`` fp32 of query ``rows`` only (causal aligned to the last key).

    Examples::

        >>> q = torch.randn(1, 2, 16, 8); k = v = torch.randn(1, 1, 16, 8)
        >>> exact_rows(q, k, v, 8 ** -0.5, True, torch.tensor([3, 15])).shape
        torch.Size([1, 2, 2, 8])
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    q_rows = q[:, :, rows].float()
    scores = (q_rows.reshape(bsz, hkv, -1, dim) @ k.float().transpose(-1, -2)).reshape(bsz, hq, len(rows), nk)
    scores = scores * scale
    if causal:
        keys = torch.arange(nk, device=scores.device)
        scores = scores.masked_fill(keys > (rows.to(scores.device) + nk - nq).unsqueeze(-1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs.reshape(bsz, hkv, -1, nk) @ v.float()).reshape(bsz, hq, len(rows), v.shape[-1])


def topk_recall(q: Tensor, k: Tensor, scale: float, rows: Tensor, selected: Tensor, topk: int) -> Tensor:
    """Share of each row's true top-``topk`` attention mass that ``selected`` covers, per head ``(B, Hq)``.

    ``selected: (B, Hq, R, Nk)`` bool, the keys a selector scores exactly for ``rows``.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scores = (q[:, :, rows].float().reshape(bsz, hkv, -1, dim) @ k.float().transpose(-1, -2))
    scores = scores.reshape(bsz, hq, len(rows), nk) * scale
    scores = scores.masked_fill(torch.arange(nk) > (rows + nk - nq).unsqueeze(-1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    top = torch.topk(probs, min(topk, nk), dim=-1)
    hit = selected.gather(-1, top.indices)
    return ((top.values * hit).sum(-1) / top.values.sum(-1)).mean(-1)


@torch.no_grad()
def token_nll(model, input_ids: Tensor, hidden: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """Negative log-likelihood ``(N - 1,)`` fp32 of each next token of ``input_ids (1, N)``.

    The LM head runs on chunks of ``chunk`` positions, so the ``N x vocab`` logits are never
    materialised at once. ``hidden (1, N, hidden)`` skips the forward pass (final hidden
    states, e.g. from :func:`hyperattn.eval.capture.capture_qkv`).

    Examples::

        >>> nll = token_nll(model, input_ids)  # doctest: +SKIP
        >>> float(nll.mean().exp())  # perplexity  # doctest: +SKIP
        4.87
    """
    if hidden is None:
        hidden = model.model(input_ids=input_ids).last_hidden_state
    head = model.get_output_embeddings()
    n = input_ids.shape[1]
    out = []
    for start in range(0, n - 1, chunk):
        stop = min(n - 1, start + chunk)
        logits = head(hidden[0, start:stop].to(head.weight.dtype)).float()
        out.append(torch.nn.functional.cross_entropy(logits, input_ids[0, start + 1:stop + 1], reduction="none"))
    return torch.cat(out)


def perplexity(nll: Tensor, start: int = 0) -> float:
    """``exp(mean(nll[start:]))``; ``start`` skips the first predicted positions."""
    return float(math.exp(float(nll[start:].double().mean())))
