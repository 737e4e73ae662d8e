"""The paper's HyperAttention (arXiv 2310.05869, Alg. 2-4), written for reading.

Non-causal ``hyper(q, k, v)`` with ``n = Nk``:

1. ``n <= min_seq_len``: exact.
2. sortLSH: hash q and k with the same hyperplanes, stable-sort each by Gray-code bucket.
3. Sorted query block ``i`` attends exactly to sorted key block ``i`` (``nb = ceil(n/b)``
   key blocks of ``b``; query blocks of ``ceil(Nq/nb)``; padded keys masked).
4. Residual: ``m`` key columns sampled, each query scores them with the sampled keys
   of its own block masked (already counted) and the logits shifted by ``log(weight)``.
5. Merge the two parts through their log-sum-exp; rows return to the original order.

Sampling is stratified: column positions ``[0, n)`` are cut into ``m`` near-equal strata
and one column is drawn uniformly in each. Every column is then included with
probability ``1/|stratum|`` (= m/n up to rounding) and weighted by ``|stratum|``, so the
residual estimate is unbiased like the paper's ``n/m`` uniform draw, never repeats a
column, and with ``m >= n`` takes every column once, which makes the result exact.

Causal attention follows the paper's recursion: split at ``h = ceil(n/2)``; both diagonal
halves recurse, the off-diagonal block (second-half queries on first-half keys) is a
non-causal ``hyper``; at ``n <= min_seq_len`` attention is exact causal. :func:`causal_plan`
unrolls that recursion into a flat list of pieces, which kernels batch by level.

Randomness is an input: :func:`draw_randomness` turns a seed into the hyperplanes and the
stratum offsets of every approximate piece, so the reference and the kernels see the
same draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .exact import attention_lse, compute_dtype, merge_lse, softmax_lse
from .lsh import draw_projections, lsh_buckets

__all__ = [
    "Piece",
    "Draws",
    "causal_plan",
    "noncausal_plan",
    "draw_randomness",
    "stratified_samples",
    "hyper_block_sample",
    "hyper_attention_reference",
    "scored_pairs",
]


@dataclass(frozen=True)
class Piece:
    """Queries ``[q0, q1)`` attend keys ``[k0, k1)``: exact causal (diagonal), exact, or approximate."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    approx: bool


def noncausal_plan(nq: int, nk: int, min_seq_len: int) -> list[Piece]:
    """One piece: all queries on all keys, approximate when ``nk > min_seq_len``."""
    return [Piece(0, nq, 0, nk, causal=False, approx=nk > min_seq_len)]


def causal_plan(nq: int, nk: int, min_seq_len: int) -> list[Piece]:
    """The causal recursion unrolled; every query's output is the LSE-merge of the pieces covering it.

    Queries are aligned to the last keys. With ``Nq < Nk`` the first ``Nk - Nq`` keys are a
    prefix every query sees (a non-causal piece); with ``Nq > Nk`` the first ``Nq - Nk``
    queries see no key and are covered by no piece. Pieces come level by level, in order
    of position, so the approximate ones have a stable index for their random draws.
    """
    pieces: list[Piece] = []
    if nk > nq:
        pieces.append(Piece(0, nq, 0, nk - nq, causal=False, approx=nk - nq > min_seq_len))
    n = min(nq, nk)
    level = [(nq - n, nk - n, n)]
    while level:
        next_level = []
        for q0, k0, length in level:
            if length <= max(min_seq_len, 1):
                pieces.append(Piece(q0, q0 + length, k0, k0 + length, causal=True, approx=False))
                continue
            half = (length + 1) // 2
            pieces.append(Piece(q0 + half, q0 + length, k0, k0 + half, causal=False, approx=half > min_seq_len))
            next_level += [(q0, k0, half), (q0 + half, k0 + half, length - half)]
        level = next_level
    return pieces


@dataclass(frozen=True)
class Draws:
    """Random inputs of one call: hyperplanes ``proj: (D, r)`` and stratum offsets ``u: (P, B, Hq, m)`` in [0, 1).

    Samples are drawn per *query* head, so a GQA call equals the same call with K/V
    repeated per query head, draw for draw.
    """

    proj: Tensor
    u: Tensor


def draw_randomness(seed: int, head_dim: int, num_projs: int, num_pieces: int, batch: int, heads: int,
                    sample_size: int, *, head_offset: int = 0, total_heads: int | None = None) -> Draws:
    """Hyperplanes and sample offsets for ``num_pieces`` approximate pieces, from a CPU generator.

    Callers pass ``sample_size = min(config.sample_size, Nk)``: no piece has more columns.
    A call on ``heads`` query heads starting at global head ``head_offset`` of
    ``total_heads`` (default ``heads``: all of them) gets those heads' offsets from the
    draw for all heads, so a head-sharded call (context parallelism) sees the draws of
    the unsharded one.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    proj = draw_projections(head_dim, num_projs, gen)
    total = heads if total_heads is None else total_heads
    u = torch.rand(num_pieces, batch, total, sample_size, generator=gen)[:, :, head_offset:head_offset + heads]
    return Draws(proj=proj, u=u.contiguous())


def stratified_samples(u: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Column indices ``(..., m)`` int64 in ``[0, n)`` and their log-weights ``log|stratum|`` fp32.

    ``u: (..., m)`` uniforms. With ``m >= n`` every column is taken once with weight 1.
    """
    m = u.shape[-1]
    if m >= n:
        idx = torch.arange(n, device=u.device).expand(*u.shape[:-1], n)
        return idx, torch.zeros(idx.shape, device=u.device)
    strata = torch.arange(m + 1, device=u.device, dtype=torch.float64) * n / m
    bounds = torch.floor(strata).long()
    lo, size = bounds[:-1], bounds[1:] - bounds[:-1]
    idx = lo + torch.clamp((u.double() * size).long(), max=size - 1)
    return idx, torch.log(size.float()).expand(idx.shape).contiguous()


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(-2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def hyper_block_sample(q: Tensor, k: Tensor, v: Tensor, scale: float, proj: Tensor, sample_idx: Tensor,
                       sample_logw: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Non-causal HyperAttention for fixed hashes and samples (steps 2-5 above), fp32.

    ``q: (B, Hq, Nq, D)``, ``k, v: (B, Hkv, Nk, D)``, ``proj: (D, r)``,
    ``sample_idx, sample_logw: (B, Hq, m)`` (columns and their log-weights, per query
    head). Returns ``out: (B, Hq, Nq, D)``, ``lse: (B, Hq, Nq)``. Differentiable in q, k, v
    (hashes, sorts and samples are constants of the function).
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    dtype = compute_dtype(q)
    qg = q.to(dtype).reshape(bsz, hkv, group, nq, dim)
    kf, vf = k.to(dtype), v.to(dtype)

    k_perm = torch.argsort(lsh_buckets(kf, proj), dim=-1, stable=True)  # (B, Hkv, Nk)
    q_perm = torch.argsort(lsh_buckets(qg, proj), dim=-1, stable=True)  # (B, Hkv, G, Nq)
    num_blocks = math.ceil(nk / block_size)
    q_block = math.ceil(nq / num_blocks)

    # Block-diagonal part, in sorted order; keys padded to num_blocks * block_size and masked.
    pad_k, pad_q = num_blocks * block_size - nk, num_blocks * q_block - nq
    k_sorted = torch.nn.functional.pad(_gather_rows(kf, k_perm), (0, 0, 0, pad_k))
    v_sorted = torch.nn.functional.pad(_gather_rows(vf, k_perm), (0, 0, 0, pad_k))
    q_sorted = torch.nn.functional.pad(_gather_rows(qg, q_perm), (0, 0, 0, pad_q))
    k_blocks = k_sorted.reshape(bsz, hkv, 1, num_blocks, block_size, dim)
    v_blocks = v_sorted.reshape(bsz, hkv, 1, num_blocks, block_size, dim)
    q_blocks = q_sorted.reshape(bsz, hkv, group, num_blocks, q_block, dim)
    scores = (q_blocks @ k_blocks.transpose(-1, -2)) * scale
    key_valid = (torch.arange(num_blocks * block_size, device=q.device) < nk).reshape(num_blocks, 1, block_size)
    scores = scores.masked_fill(~key_valid, float("-inf"))
    out_blk, lse_blk = softmax_lse(scores, v_blocks)
    out_blk = out_blk.reshape(bsz, hkv, group, -1, dim)[..., :nq, :]
    lse_blk = lse_blk.reshape(bsz, hkv, group, -1)[..., :nq]
    q_inv = torch.argsort(q_perm, dim=-1)
    out_blk = _gather_rows(out_blk, q_inv)
    lse_blk = lse_blk.gather(-1, q_inv)

    # Residual part, in original query order: sampled keys of a query's own block are masked.
    q_block_id = q_inv // q_block  # (B, Hkv, G, Nq)
    sample_idx = sample_idx.reshape(bsz, hkv, group * sample_idx.shape[-1])
    k_block_id = (torch.argsort(k_perm, dim=-1) // block_size).gather(-1, sample_idx)
    k_block_id = k_block_id.reshape(bsz, hkv, group, -1)  # (B, Hkv, G, m)
    k_s = _gather_rows(kf, sample_idx).reshape(bsz, hkv, group, -1, dim)
    v_s = _gather_rows(vf, sample_idx).reshape(bsz, hkv, group, -1, dim)
    scores = (qg @ k_s.transpose(-1, -2)) * scale + sample_logw.to(dtype).reshape(bsz, hkv, group, 1, -1)
    own = q_block_id.unsqueeze(-1) == k_block_id.unsqueeze(3)
    out_s, lse_s = softmax_lse(scores.masked_fill(own, float("-inf")), v_s)

    out, lse = merge_lse(out_blk, lse_blk, out_s, lse_s)
    return out.reshape(bsz, hq, nq, dim), lse.reshape(bsz, hq, nq)


def hyper_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool, block_size: int,
                              sample_size: int, num_projs: int, min_seq_len: int, seed: int, head_offset: int = 0,
                              total_heads: int | None = None) -> tuple[Tensor, Tensor]:
    """The paper's method on validated inputs: ``out (B, Hq, Nq, D)`` and ``lse (B, Hq, Nq)``.

    Both fp32 (float64 for float64 inputs).

    Differentiable: for a fixed ``seed`` the hashes and samples are fixed, so autograd gives
    the exact gradient of this function.

    ``head_offset``, ``total_heads``: q's heads are global heads ``[head_offset,
    head_offset + Hq)`` of ``total_heads`` (default: all of them), as in :func:`draw_randomness`.
    """
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    plan = causal_plan(nq, nk, min_seq_len) if causal else noncausal_plan(nq, nk, min_seq_len)
    approx = [p for p in plan if p.approx]
    draws = draw_randomness(seed, dim, num_projs, len(approx), bsz, hq, min(sample_size, nk), head_offset=head_offset,
                            total_heads=total_heads)

    dtype = compute_dtype(q)
    out = q.new_zeros(bsz, hq, nq, v.shape[-1], dtype=dtype)
    lse = q.new_full((bsz, hq, nq), float("-inf"), dtype=dtype)
    approx_index = 0
    for piece in plan:
        qs = q[:, :, piece.q0:piece.q1]
        ks, vs = k[:, :, piece.k0:piece.k1], v[:, :, piece.k0:piece.k1]
        if piece.approx:
            idx, logw = stratified_samples(draws.u[approx_index].to(q.device), piece.k1 - piece.k0)
            approx_index += 1
            o, l = hyper_block_sample(qs, ks, vs, scale, draws.proj, idx, logw, block_size)
        else:
            o, l = attention_lse(qs, ks, vs, scale, causal=piece.causal)
        o, l = merge_lse(out[:, :, piece.q0:piece.q1], lse[:, :, piece.q0:piece.q1], o, l)
        # Rebuilt by concatenation rather than written in place, so autograd sees a pure function.
        out = torch.cat([out[:, :, :piece.q0], o, out[:, :, piece.q1:]], dim=2)
        lse = torch.cat([lse[:, :, :piece.q0], l, lse[:, :, piece.q1:]], dim=2)
    return out, lse


def scored_pairs(plan: list[Piece], block_size: int, sample_size: int, nq: int, nk: int) -> int:
    """(query, key) scores computed by one head under ``plan`` (the budget accounting of ``stats``)."""
    total = 0
    for p in plan:
        pq, pk = p.q1 - p.q0, p.k1 - p.k0
        if p.approx:
            total += pq * (min(block_size, pk) + min(sample_size, pk))
        elif p.causal:
            total += pq * (pq + 1) // 2
        else:
            total += pq * pk
    return total
