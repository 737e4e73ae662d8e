"""Peer sparse-attention patterns and the oracle limit, in the same harness as ``"structured"``.

Every peer has the runner signature of :mod:`hyperattn.ops` and the same budget
accounting (``stats.keys_per_query``: scores computed per query for visible keys,
estimation passes included). Like the structured method, rows that see at most
``min_seq_len`` keys are exact. Each pattern is written as a per-row key mask (plus, for
the oracle, sampled tail columns) applied to dense scores: the reference is for reading
and for measuring quality, not for speed.

Budgets come from :class:`~hyperattn.config.HyperAttentionConfig`:

================  ==============================================================  ==========================
method            keys scored exactly per row                                     estimation
================  ==============================================================  ==========================
streaming         first ``num_sinks`` keys + ``window`` most recent               none
vertical_slash    ``num_sinks + heavy_columns`` columns + ``window`` diagonals     last ``probe_rows`` rows
block_topk        ``key_blocks`` key blocks of 64 + first and diagonal blocks      pooled q/k block scores
oracle_topk       the row's true top ``block_size`` keys                          ``sample_size`` samples
================  ==============================================================  ==========================

- streaming: StreamingLLM (attention sinks + sliding window).
- vertical_slash: MInference's pattern; the last ``probe_rows`` queries are scored
  against all keys, the columns ("vertical") and diagonals ("slash") with the most mass
  are kept for every row; the first ``num_sinks`` columns and the 64 nearest diagonals are
  always kept.
- block_topk: block-sparse attention; 64x64 blocks ranked by ``mean(q_block) .
  mean(k_block)``, the top ``key_blocks`` per query block kept.
- oracle_topk: knows every row's true scores (not implementable fast); the top
  ``block_size`` keys exact plus ``sample_size`` stratified samples of the rest weighted by
  the stratum size (unbiased), so with enough samples it is exact. The limit line.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .exact import compute_dtype, softmax_lse

__all__ = ["RUNNERS", "peer_rows"]


def first_approx_row(nq: int, nk: int, causal: bool, min_seq_len: int) -> int:
    """First query row that sees more than ``min_seq_len`` keys (``Nq`` if none does)."""
    if not causal:
        return 0 if nk > min_seq_len else nq
    # Row i sees i + 1 + (Nk - Nq) keys.
    return min(nq, max(0, min_seq_len - (nk - nq)))

_NEG_INF = float("-inf")
_BLOCK = 64  # query/key block of block_topk and forced diagonals of vertical_slash
_ROW_CHUNK = 512


def _dense_scores(q_rows: Tensor, k: Tensor, scale: float) -> Tensor:
    """``(B, Hq, R, Nk)`` scaled logits of ``q_rows: (B, Hq, R, D)`` against ``k: (B, Hkv, Nk, D)``."""
    bsz, hq, rows, dim = q_rows.shape
    hkv = k.shape[1]
    return (q_rows.reshape(bsz, hkv, -1, dim) @ k.transpose(-1, -2)).reshape(bsz, hq, rows, -1) * scale


def _prepare(name: str, q: Tensor, k: Tensor, scale: float, causal: bool, config, seed: int) -> dict:
    """Per-call statistics of a pattern (shared by all rows)."""
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    keys = torch.arange(nk, device=q.device)
    offset = nk - nq
    state: dict = {}
    if name == "vertical_slash":
        probe = torch.arange(max(0, nq - config.probe_rows), nq, device=q.device)
        s = _dense_scores(q[:, :, probe], k, scale)
        if causal:
            s = s.masked_fill(keys > (probe + offset).unsqueeze(-1), _NEG_INF)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # (B, Hq, P, Nk)
        vertical = p.sum(2).masked_fill(keys < config.num_sinks, float("inf"))
        vert = torch.zeros_like(vertical, dtype=torch.bool)
        count = min(nk, config.num_sinks + config.heavy_columns)
        state["vertical"] = vert.scatter(-1, torch.topk(vertical, count, dim=-1).indices, True)
        # Diagonal d holds keys (row + offset) - d. Aligned positions run from offset = Nk - Nq
        # to Nk - 1, so d lies in [1 - Nq, Nk - 1] (below 1 - Nk only when Nq > Nk) and is
        # stored at index d + shift, shift = max(Nq, Nk) - 1.
        shift = max(nq, nk) - 1
        diag = (probe + offset).unsqueeze(-1) - keys  # (P, Nk)
        slash = torch.zeros(bsz, hq, shift + nk, device=q.device, dtype=p.dtype)
        slash = slash.index_add(-1, (diag + shift).reshape(-1), p.reshape(bsz, hq, -1))
        near = torch.arange(shift + nk, device=q.device) - shift
        slash = slash.masked_fill((near >= 0) & (near < _BLOCK), float("inf"))
        sl = torch.zeros_like(slash, dtype=torch.bool)
        state["slash"] = sl.scatter(-1, torch.topk(slash, min(config.window, shift + nk), dim=-1).indices, True)
        state["shift"] = shift
        state["pairs"] = float((probe + offset + 1).clamp(min=0, max=nk).sum()) if causal else len(probe) * nk
    elif name == "block_topk":
        nqb, nkb = math.ceil(nq / _BLOCK), math.ceil(nk / _BLOCK)
        qp = torch.nn.functional.pad(q.float(), (0, 0, 0, nqb * _BLOCK - nq)).reshape(bsz, hq, nqb, _BLOCK, dim)
        kp = torch.nn.functional.pad(k.float(), (0, 0, 0, nkb * _BLOCK - nk)).reshape(bsz, k.shape[1], nkb, _BLOCK,
                                                                                      dim)
        qn = torch.clamp(nq - _BLOCK * torch.arange(nqb, device=q.device), max=_BLOCK).unsqueeze(-1)
        kn = torch.clamp(nk - _BLOCK * torch.arange(nkb, device=q.device), max=_BLOCK).unsqueeze(-1)
        score = _dense_scores(qp.sum(3) / qn, kp.sum(3) / kn, scale)  # (B, Hq, nqb, nkb)
        if causal:
            last_row = torch.clamp(_BLOCK * torch.arange(1, nqb + 1, device=q.device), max=nq) - 1 + offset
            score = score.masked_fill(_BLOCK * torch.arange(nkb, device=q.device) > last_row.unsqueeze(-1),
                                      _NEG_INF)
        chosen = torch.zeros_like(score, dtype=torch.bool)
        top = torch.topk(score, min(config.key_blocks, nkb), dim=-1)
        chosen = chosen.scatter(-1, top.indices, torch.isfinite(top.values))
        chosen[..., 0] = True
        state["blocks"] = chosen
        state["pairs"] = float(nqb * nkb)  # pooled block scores, per head
    return state


def _row_mask(name: str, state: dict, rows: Tensor, nq: int, nk: int, causal: bool, config) -> Tensor:
    """Keys each row scores exactly, ``(B or 1, Hq or 1, R, Nk)`` bool (before the causal mask)."""
    keys = torch.arange(nk, device=rows.device)
    pos = (rows + nk - nq).unsqueeze(-1)  # aligned position of each row
    if name == "streaming":
        return ((keys < config.num_sinks) | ((keys > pos - config.window) & (keys <= pos)))[None, None]
    if name == "vertical_slash":
        diag = pos - keys + state["shift"]  # (R, Nk), within the stored range for every row
        slash = state["slash"]
        on_slash = slash.gather(-1, diag.reshape(1, 1, -1).expand(*slash.shape[:2], -1)).reshape(
            *slash.shape[:2], *diag.shape)
        return state["vertical"].unsqueeze(2) | on_slash
    if name == "block_topk":
        blocks = state["blocks"][:, :, rows // _BLOCK]  # (B, Hq, R, nkb)
        mask = blocks.repeat_interleave(_BLOCK, dim=-1)[..., :nk]
        diagonal = (keys // _BLOCK) == (pos // _BLOCK)
        return mask | diagonal[None, None]
    raise ValueError(f"method: expected a peer pattern, got {name!r}")


def peer_rows(name: str, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, config, seed: int,
              rows: Tensor) -> tuple[Tensor, Tensor, float]:
    """Outputs of peer ``name`` at query ``rows`` only (identical to those rows of the full call).

    Returns ``out (B, Hq, R, D)``, ``lse (B, Hq, R)`` fp32 (float64 for float64 inputs) and the average keys scored per
    row over ``rows`` (rows exact by construction count as exact).
    """
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    dtype = compute_dtype(q)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    r0 = first_approx_row(nq, nk, causal, config.effective_min_seq_len)
    state = _prepare(name, qf, kf, scale, causal, config, seed)
    keys = torch.arange(nk, device=q.device)
    if name == "oracle_topk":  # stratum offsets of every row, so a row's samples do not depend on `rows`
        gen = torch.Generator(device="cpu").manual_seed(seed)
        offsets = torch.rand(bsz, hq, nq, config.sample_size, generator=gen)
    outs, lses, scored = [], [], 0.0
    for c0 in range(0, len(rows), _ROW_CHUNK):
        r = rows[c0:c0 + _ROW_CHUNK].to(q.device)
        s = _dense_scores(qf[:, :, r], kf, scale)
        visible = (keys <= (r + nk - nq).unsqueeze(-1)) if causal else torch.ones(len(r), nk, dtype=torch.bool,
                                                                                  device=q.device)
        visible = visible[None, None].expand(bsz, hq, -1, -1)
        approx = (r >= r0)[None, None, :, None]
        if name == "oracle_topk":
            s = s.masked_fill(~visible, _NEG_INF)
            keep, logw, count = _oracle(s, config.block_size, offsets[:, :, r.cpu()].to(q.device))
            s = torch.where(approx, s + logw, s).masked_fill(approx & ~keep, _NEG_INF)
            scored += float(torch.where(approx[..., 0], count, visible.sum(-1)).sum())
        else:
            mask = _row_mask(name, state, r, nq, nk, causal, config) & visible
            mask = torch.where(approx, mask, visible)
            s = s.masked_fill(~mask, _NEG_INF)
            scored += float(mask.sum())
        # softmax_lse rather than logsumexp: rows with no visible key (causal, Nq > Nk) keep a
        # zero gradient instead of NaN.
        out, lse = softmax_lse(s.reshape(bsz, vf.shape[1], -1, nk), vf)  # K/V shared by each group of heads
        outs.append(out.reshape(bsz, hq, len(r), -1))
        lses.append(lse.reshape(bsz, hq, len(r)))
    extra = state.get("pairs", 0.0)
    per_row = (scored / (bsz * hq) + extra * len(rows) / nq) / len(rows)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), per_row


def _oracle(s: Tensor, topk: int, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``topk`` of each row exact plus stratified samples of the rest, one per offset in ``u (B, Hq, R, m)``.

    Returns ``keep (B, Hq, R, Nk)`` bool, ``logw`` (log-weights, 0 on the top keys) and the
    per-row count of scored keys.
    """
    visible = torch.isfinite(s)
    count = min(topk, s.shape[-1])
    top = torch.topk(s, count, dim=-1).indices
    keep = torch.zeros_like(visible).scatter(-1, top, True) & visible
    rest = visible & ~keep
    rest_count = rest.sum(-1, keepdim=True)
    logw = torch.zeros_like(s)
    samples = u.shape[-1]
    if samples > 0:
        strata = torch.arange(samples + 1, device=s.device)
        bounds = torch.div(strata * rest_count, samples, rounding_mode="floor")
        lo, size = bounds[..., :-1], bounds[..., 1:] - bounds[..., :-1]
        rank = lo + torch.minimum((u * size).long(), (size - 1).clamp(min=0))
        idx = torch.searchsorted(rest.long().cumsum(-1), rank + 1).clamp(max=s.shape[-1] - 1)
        valid = size > 0
        sampled = torch.zeros_like(keep).scatter(-1, torch.where(valid, idx, top[..., :1]), valid)
        sampled &= rest
        w = torch.zeros_like(s).scatter(-1, torch.where(valid, idx, top[..., :1]),
                                        torch.log(size.clamp(min=1).to(s.dtype)).masked_fill(~valid, 0.0))
        logw = torch.where(sampled, w, logw)
        keep = keep | sampled
    return keep, logw, keep.sum(-1)


def _runner(name: str):
    def run(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, config, seed: int):
        from ..ops import AttentionStats

        out, lse, per_row = peer_rows(name, q, k, v, scale, causal, config, seed,
                                      torch.arange(q.shape[2], device=q.device))
        zeros = torch.zeros(q.shape[0], q.shape[1], device=q.device)
        nan = torch.full_like(zeros, float("nan"))
        return out, lse, AttentionStats(name, per_row, nan, zeros.bool())

    run.__name__ = f"run_{name}"
    run.__doc__ = f"Runner of ``method={name!r}`` (see the module docstring)."
    return run


#: method name -> runner ``(q, k, v, scale, causal, config, seed) -> (out, lse, AttentionStats)``.
RUNNERS = {name: _runner(name) for name in ("streaming", "vertical_slash", "block_topk", "oracle_topk")}
