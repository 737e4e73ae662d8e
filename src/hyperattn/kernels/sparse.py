"""Triton engine of the structured method's attention step: two launches forward, five backward, no copies of q, k, v.

:func:`attend_triton` computes :func:`hyperattn.reference.structured.attend`, and its
gradient for the fixed selection (five launches, described where the backward kernels
begin). The forward:

1. ``_lsh_kernel``: every tile of bucket-sorted rows (a KV head's query heads sorted
   together, so a tile's ranges overlap: it spans fewer key slots) over the sorted key
   slots its rows' ranges span, keys read through the sort order, masked to each row's
   range minus its exact blocks; its output and LSE stored at the rows' original
   positions, in the output tensor itself (in the inputs' dtype);
2. ``_sparse_kernel``: every selected query block of every head over its exact blocks
   (the leading tiles every row sees whole in an unmasked loop, the rest masked) and then
   its chunk's gathered columns (log-weights as a bias, masked outside the block's
   complement and inside each row's LSH range), one online softmax; LSE-merged with (1),
   read back from the output in contiguous rows, and stored in place.

Running the LSH pass first keeps the scattered accesses to one store per row (the other
order reads an fp32 intermediate back at scattered rows: 2 GB more traffic at 131k).

FlexAttention runs the same function as three passes plus merges
(:func:`hyperattn.kernels.structured.attend_flex`); ``benchmarks/NOTES.md`` has both timed.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.selection import Lsh, Plan, Selection, sorted_spans
from .attention import (_add_into, _bwd_lse2, _key_tile, _kv_at, _lse_merge, _normalised, _precision, _sorted_kv,
                        _tile_dkv, _tile_dq, _tile_update)

__all__ = ["attend_triton", "attend_forward", "attend_backward", "attend_rows_triton"]


@triton.jit
def _start(Q, b, h, kvh, rows, row_ok, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_vb, stride_vh,
           M: tl.constexpr, HEAD_DIM: tl.constexpr):
    # A program's query rows, its KV head's offsets and an empty online softmax.
    offs_d = tl.arange(0, HEAD_DIM)
    # h: one head, or each row's (the LSH pass's tiles mix the group's heads).
    q = tl.load(Q + (b * stride_qb + h * stride_qh + rows * stride_qn)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    acc = tl.zeros([M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    return q, acc, m_i, l_i, b * stride_kb + kvh * stride_kh, b * stride_vb + kvh * stride_vh


@triton.jit
def _gathered_cols(GIDX, GLOGW, GSLOT, EB, sel, num_e, sj, wlo, whi, CAUSAL: tl.constexpr, T: tl.constexpr):
    # Which of a chunk's gathered columns (slots sj of the copies) block j may use: those in
    # its complement (candidates, window [wlo, whi] excluded, not among its exact blocks
    # EB[sel]). Their key positions, sorted LSH slots and log-weights as a base-2 bias.
    idx = tl.load(GIDX + sj)
    logw = tl.load(GLOGW + sj)
    slot = tl.load(GSLOT + sj)
    blk = idx // T
    ok = logw > float("-inf")
    if CAUSAL:
        ok = ok & (blk < wlo)
    else:
        ok = ok & ((blk < wlo) | (blk > whi))
    for e in range(num_e):
        ok = ok & (blk != tl.load(EB + sel * num_e + e))
    return idx, ok, slot, tl.where(ok, logw, 0.0) * 1.4426950408889634


@triton.jit
def _outside_lsh(ok, slot, lo, hi, row_ok):
    # A row's usable gathered columns: not in its LSH range (those keys are exact in the LSH pass).
    return ok[None, :] & row_ok[:, None] & ((slot[None, :] < lo[:, None]) | (slot[None, :] >= hi[:, None]))


@triton.jit
def _gathered_tile(KG, VG, GIDX, GLOGW, GSLOT, EB, sel, num_e, sj, wlo, whi, lo, hi, row_ok, offs_d,
                   CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, T: tl.constexpr):
    # One tile of gathered columns for rows of block j: keys, values, mask and bias.
    _, ok, slot, bias = _gathered_cols(GIDX, GLOGW, GSLOT, EB, sel, num_e, sj, wlo, whi, CAUSAL, T)
    k = tl.load(KG + sj[:, None] * HEAD_DIM + offs_d[None, :])
    v = tl.load(VG + sj[:, None] * HEAD_DIM + offs_d[None, :])
    return k, v, _outside_lsh(ok, slot, lo, hi, row_ok), bias[None, :]


@triton.jit
def _gathered_tiles(acc, m_i, l_i, q, KG, VG, GIDX, GLOGW, GSLOT, EB, WLO, WHI, LO, HI, sel, num_e, j, bh, rows,
                    row_ok, nq, g_base, s_pad, offs_n, offs_d, qk_scale, CAUSAL: tl.constexpr,
                    HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # Block j's rows over its chunk's gathered columns (_gathered_tile), one online softmax.
    wlo = tl.load(WLO + j).to(tl.int32)  # the plan's int64 tables, read as they are
    whi = tl.load(WHI + j).to(tl.int32)
    lo = tl.load(LO + bh * nq + rows, mask=row_ok, other=0)
    hi = tl.load(HI + bh * nq + rows, mask=row_ok, other=0)
    for s0 in range(0, s_pad, BLOCK_N):
        k, v, valid, bias = _gathered_tile(KG, VG, GIDX, GLOGW, GSLOT, EB, sel, num_e, g_base + s0 + offs_n, wlo, whi,
                                           lo, hi, row_ok, offs_d, CAUSAL, HEAD_DIM, T)
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, bias, valid, qk_scale, True, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _block_program(num_heads, group, first, nq, T: tl.constexpr):
    # A program's selected block jj (query block j = first + jj) of head bh, and its rows.
    jj = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % num_heads
    j = first + jj
    rows = j * T + tl.arange(0, T)
    return jj, bh, bh // num_heads, h, h // group, j, rows, rows < nq


@triton.jit
def _whole_tiles(EB, sel, num_e, win_width, j, nk, offset, n_tiles, CAUSAL: tl.constexpr, T: tl.constexpr,
                 BLOCK_N: tl.constexpr, NE_P: tl.constexpr):
    # Selected block sel's exact-block tiles, the entries after the window's first (the top
    # blocks), then the window's in ascending order: under exact_blocks' layout the tiles
    # that need a mask (the diagonal's, a ragged last block) come last. The length of the
    # leading run every row of block j sees whole (or padding, -1, which a scalar -inf drops).
    TPB: tl.constexpr = T // BLOCK_N
    tiles = tl.arange(0, NE_P * TPB)
    kb_t = tl.load(EB + sel * num_e + (tiles // TPB + win_width) % tl.maximum(num_e, 1), mask=tiles < n_tiles,
                   other=-1)
    c0_t = kb_t * T + (tiles % TPB) * BLOCK_N
    whole = c0_t + BLOCK_N <= nk
    if CAUSAL:
        whole = whole & (c0_t + BLOCK_N - 1 <= j * T + offset)
    return tl.min(tl.where((tiles < n_tiles) & (kb_t >= 0) & ~whole, tiles, n_tiles), 0)


@triton.jit
def _exact_tile(K, V, EB, sel, num_e, win_width, t, rows, nk, offset, k_base, v_base, stride_kn, stride_vn, offs_n,
                offs_d, CAUSAL: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr):
    # Tile t of selected block sel's exact blocks (_whole_tiles' order): keys and values, a
    # scalar bias for a whole tile (-inf: padding, -1) and the mask of a partial one.
    TPB: tl.constexpr = T // BLOCK_N
    kb = tl.load(EB + sel * num_e + (t // TPB + win_width) % num_e)
    cols = tl.maximum(kb, 0) * T + (t % TPB) * BLOCK_N + offs_n
    k_ok = (cols < nk) & (kb >= 0)
    k, v = _kv_at(K, V, cols, k_ok, k_base, v_base, stride_kn, stride_vn, offs_d)
    valid = k_ok[None, :]
    if CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None] + offset)
    return k, v, tl.where(kb >= 0, 0.0, float("-inf")), valid


@triton.jit
def _exact_blocks_pass(acc, m_i, l_i, q, K, V, EB, sel, num_e, win_width, j, rows, nk, offset, k_base, v_base,
                       stride_kn, stride_vn, offs_n, offs_d, qk_scale, CAUSAL: tl.constexpr, T: tl.constexpr,
                       BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, NE_P: tl.constexpr):
    # Selected block sel's exact blocks' tiles (_whole_tiles' order) for rows of query block
    # j: the leading run every row sees whole is one unmasked loop the compiler can
    # pipeline; the rest is masked.
    n_tiles = num_e * (T // BLOCK_N)
    n_whole = _whole_tiles(EB, sel, num_e, win_width, j, nk, offset, n_tiles, CAUSAL, T, BLOCK_N, NE_P)
    for t in range(0, n_whole):
        k, v, pad, _ = _exact_tile(K, V, EB, sel, num_e, win_width, t, rows, nk, offset, k_base, v_base,
                                   stride_kn, stride_vn, offs_n, offs_d, CAUSAL, T, BLOCK_N)
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, pad, None, qk_scale, False, PRECISION)
    for t in range(n_whole, n_tiles):
        k, v, _, valid = _exact_tile(K, V, EB, sel, num_e, win_width, t, rows, nk, offset, k_base, v_base,
                                     stride_kn, stride_vn, offs_n, offs_d, CAUSAL, T, BLOCK_N)
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, True, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _merge_into(OUT, LSE, acc, m_i, l_i, bh, nq, rows, row_ok, offs_d, HEAD_DIM: tl.constexpr):
    # The online softmax's result LSE-merged with the LSH part the first launch left in
    # OUT/LSE (contiguous rows here, where the LSH pass's rows are scattered), in place:
    # the one store of the result.
    out, lse = _normalised(acc, m_i, l_i)
    flat = bh * nq + rows
    o_ptrs = OUT + flat[:, None] * HEAD_DIM + offs_d[None, :]
    prev_lse = tl.load(LSE + flat, mask=row_ok, other=float("-inf"))
    prev = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    out, lse = _lse_merge(prev, prev_lse, out, lse)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + flat, lse, mask=row_ok)


@triton.jit
def _sparse_kernel(Q, K, V, KG, VG, OUT, LSE, EB, ACTIVE, WLO, WHI, GIDX, GLOGW, GSLOT, LO, HI,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   num_heads, group, kv_heads, nq, nk, offset, first, c_blocks, num_e, chunk_blocks, num_chunks,
                   s_pad, win_width, qk_scale,
                   CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, NE_P: tl.constexpr):
    # One query block of one head: its exact blocks, then its chunk's gathered columns, in
    # one online softmax (the block-sparse and the gathered pass of attend_flex, fused).
    jj, bh, b, h, kvh, j, rows, row_ok = _block_program(num_heads, group, first, nq, T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = qk_scale * 1.4426950408889634
    q, acc, m_i, l_i, k_base, v_base = _start(Q, b, h, kvh, rows, row_ok, stride_qb, stride_qh, stride_qn, stride_kb,
                                              stride_kh, stride_vb, stride_vh, T, HEAD_DIM)
    sel = bh * c_blocks + jj
    if tl.load(ACTIVE + sel) != 0:
        acc, m_i, l_i = _exact_blocks_pass(acc, m_i, l_i, q, K, V, EB, sel, num_e, win_width, j, rows, nk, offset,
                                           k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, qk_scale, CAUSAL, T,
                                           BLOCK_N, PRECISION, NE_P)
        g_base = ((b * kv_heads + kvh) * num_chunks + j // chunk_blocks) * s_pad
        acc, m_i, l_i = _gathered_tiles(acc, m_i, l_i, q, KG, VG, GIDX, GLOGW, GSLOT, EB, WLO, WHI, LO, HI, sel, num_e,
                                        j, bh, rows, row_ok, nq, g_base, s_pad, offs_n, offs_d, qk_scale, CAUSAL,
                                        HEAD_DIM, T, BLOCK_N, PRECISION)
    _merge_into(OUT, LSE, acc, m_i, l_i, bh, nq, rows, row_ok, offs_d, HEAD_DIM)


@triton.jit
def _lsh_rows(QORDER, LO, HI, bkv, kvh, tile, nq, group, row0, first, c_blocks, BLOCK_M: tl.constexpr,
              T: tl.constexpr):
    # Tile `tile` of the bucket-sorted rows of KV head bkv's query heads (Lsh.q_order: row r
    # of the group's head g numbered g * nq + r; rows before row0 are not the function's):
    # each row's head (h, and bh = b * Hq + h), its LSH range and its selected block (for
    # its exact blocks).
    n_sorted = group * nq
    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    s_ok = slots < n_sorted
    idx = tl.load(QORDER + bkv * n_sorted + slots, mask=s_ok, other=0)
    g = idx // nq
    rows = idx - g * nq
    h = kvh * group + g
    bh = bkv * group + g
    row_ok = s_ok & (rows >= row0)
    lo = tl.load(LO + bkv * n_sorted + idx, mask=row_ok, other=0)
    hi = tl.load(HI + bkv * n_sorted + idx, mask=row_ok, other=0)
    busy = row_ok & (lo < hi)
    return h, bh, rows, row_ok, lo, hi, busy, bh * c_blocks + tl.where(busy, rows // T - first, 0)


@triton.jit
def _lsh_tile(QORDER, LO, HI, group, kv_heads, nq, row0, first, c_blocks, BLOCK_M: tl.constexpr, T: tl.constexpr):
    # A row-outer program's tile (_lsh_rows; program (tile, b * Hkv + KV head)) and the
    # sorted key slots [start, end) it spans.
    bkv = tl.program_id(1).to(tl.int64)
    kvh = bkv % kv_heads
    h, bh, rows, row_ok, lo, hi, busy, sel = _lsh_rows(QORDER, LO, HI, bkv, kvh, tl.program_id(0), nq, group, row0,
                                                       first, c_blocks, BLOCK_M, T)
    start = tl.min(tl.where(busy, lo, 2147483647), 0)
    end = tl.max(tl.where(busy, hi, 0), 0)
    return bkv // kv_heads, h, kvh, bkv, bh, rows, row_ok, lo, hi, busy, sel, start, end


@triton.jit
def _lsh_mask(EB, ks, kblk, lo, hi, busy, sel, num_e, e0):
    # Which (row, sorted key slot) pairs the LSH pass scores: the slot in the row's range
    # [lo, hi), its key's block (kblk) not among the exact blocks of the row's selected
    # block (sel; rows not busy have none). Each row's exact blocks are reloaded per key
    # tile (from L1/L2): holding them as one [rows, blocks] tile and comparing in 3-D
    # measured slower (4.2 against 3.9 ms at 131k). Entries before e0 are skipped: causal,
    # they are the window's blocks, which start after every key of the row's range.
    valid = (ks[None, :] >= lo[:, None]) & (ks[None, :] < hi[:, None])
    for e in range(e0, num_e):
        eb = tl.load(EB + sel * num_e + e, mask=busy, other=-1)
        valid = valid & (kblk[None, :] != eb[:, None])
    return valid


@triton.jit
def _lsh_keys(K, V, ORDER, EB, ks, end, k_base, v_base, stride_kn, stride_vn, offs_d, lo, hi, busy, sel, num_e, e0,
              T: tl.constexpr):
    # A tile of sorted key slots ks (below end) of a row tile's span: its keys and values,
    # read through the sort order, and which (row, slot) pairs the LSH pass scores.
    k_ok = ks < end
    cols, k, v = _sorted_kv(K, V, ORDER, ks, k_ok, k_base, v_base, stride_kn, stride_vn, offs_d)
    return k, v, _lsh_mask(EB, ks, cols // T, lo, hi, busy, sel, num_e, e0)


@triton.jit
def _lsh_kernel(Q, K, V, OUT, LSE, QORDER, KORDER, LO, HI, EB,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                group, kv_heads, nq, nk, row0, first, c_blocks, num_e, e0, qk_scale,
                HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    # A tile of bucket-sorted rows over the sorted key slots their ranges span (keys read
    # through the sort order: sorted copies of K and V cost more to make, 0.9 ms at 131k,
    # than they saved here, 0.3), minus each row's exact blocks; stored at the rows'
    # original positions, where the sparse kernel merges it with the rest.
    b, h, kvh, bkv, bh, rows, row_ok, lo, hi, busy, sel, start, end = _lsh_tile(QORDER, LO, HI, group, kv_heads, nq,
                                                                                 row0, first, c_blocks, BLOCK_M, T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = qk_scale * 1.4426950408889634
    q, acc, m_i, l_i, k_base, v_base = _start(Q, b, h, kvh, rows, row_ok, stride_qb, stride_qh, stride_qn, stride_kb,
                                              stride_kh, stride_vb, stride_vh, BLOCK_M, HEAD_DIM)
    # No test for key tiles that meet no row's range (a tile straddling two buckets): such
    # gaps are rare, and a branch around the product would stop the loop's pipelining.
    for n0 in range(start, end, BLOCK_N):
        k, v, valid = _lsh_keys(K, V, KORDER + bkv * nk, EB, n0 + offs_n, end, k_base, v_base, stride_kn,
                                stride_vn, offs_d, lo, hi, busy, sel, num_e, e0, T)
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, True, PRECISION)
    out, lse = _normalised(acc, m_i, l_i)
    flat = bh * nq + rows
    tl.store(OUT + flat[:, None] * HEAD_DIM + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + flat, lse, mask=row_ok)


# The backward: dq row-outer, as the forward runs (the LSH tiles, then each selected block
# over its exact blocks and gathered columns, adding the LSH part in place of the merge);
# dk, dv key-outer, each key tile's gradient summed on chip over every row tile that
# scored it and stored once (the exact blocks through transposed lists of the forward's
# selection, the LSH slots through runs of sorted row tiles); the gathered columns' by one
# atomic add per column per chunk, as a column may be drawn by several chunks. P is
# recomputed from the merged LSE, so each part's gradient is already that of the merged
# softmax.


@triton.jit
def _grad_inputs(Q, DO, LSE2, b, h, bh, rows, row_ok, row0, n_rows, stride_qb, stride_qh, stride_qn, offs_d,
                 HEAD_DIM: tl.constexpr):
    # q and dO at rows (dO full-length and contiguous: a driver's gradient of every row, so
    # nobody copies the function's rows out of it), and the base-2 LSE (+inf: no key) of the
    # function's rows (rows row0 on, stored contiguously, at flat); row_ok implies rows >= row0.
    q = tl.load(Q + (b * stride_qb + h * stride_qh + rows * stride_qn)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    flat = bh * n_rows + rows - row0
    do = tl.load(DO + (bh * (n_rows + row0) + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)
    lse2 = tl.load(LSE2 + flat, mask=row_ok, other=float("inf"))
    return q, do, lse2, flat


@triton.jit
def _grad_rows(Q, DO, LSE2, DELTA, b, h, bh, rows, row_ok, row0, n_rows, stride_qb, stride_qh, stride_qn, offs_d,
               HEAD_DIM: tl.constexpr):
    # _grad_inputs and the rows' delta (stored by _lsh_dq_kernel).
    q, do, lse2, flat = _grad_inputs(Q, DO, LSE2, b, h, bh, rows, row_ok, row0, n_rows, stride_qb, stride_qh,
                                     stride_qn, offs_d, HEAD_DIM)
    return q, do, lse2, tl.load(DELTA + flat, mask=row_ok, other=0.0)


@triton.jit
def _lsh_dq_kernel(Q, K, V, DO, OUT, DLSE, LSE2, DELTA, DQL, QORDER, KORDER, LO, HI, EB,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   group, kv_heads, nq, nk, row0, n_rows, first, c_blocks, num_e, e0, scale,
                   HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, HAS_DLSE: tl.constexpr):
    # dq of the LSH part for a tile of bucket-sorted rows (as _lsh_kernel), stored fp32 at
    # the rows' original positions: every row of the function once (zeros where none).
    # This launch visits every row first, so it also finds and stores each row's delta,
    # rowsum(dO * out) minus the LSE's gradient, which every later launch reads (a
    # separate pass in PyTorch cost 5 ms at 131k: fp32 copies of dO and out).
    b, h, kvh, bkv, bh, rows, row_ok, lo, hi, busy, sel, start, end = _lsh_tile(QORDER, LO, HI, group, kv_heads, nq,
                                                                                 row0, first, c_blocks, BLOCK_M, T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = scale * 1.4426950408889634
    q, do, lse2, flat = _grad_inputs(Q, DO, LSE2, b, h, bh, rows, row_ok, row0, n_rows, stride_qb, stride_qh,
                                     stride_qn, offs_d, HEAD_DIM)
    out = tl.load(OUT + (bh * nq + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + flat, mask=row_ok, other=0.0)
    tl.store(DELTA + flat, delta, mask=row_ok)
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        k, v, valid = _lsh_keys(K, V, KORDER + bkv * nk, EB, n0 + offs_n, end, k_base, v_base, stride_kn,
                                stride_vn, offs_d, lo, hi, busy, sel, num_e, e0, T)
        dq = _tile_dq(dq, q, do, lse2, delta, k, v, 0.0, valid, qk_scale, True, PRECISION)
    tl.store(DQL + flat[:, None] * HEAD_DIM + offs_d[None, :], dq * scale, mask=row_ok[:, None])


@triton.jit
def _sparse_dq_kernel(Q, K, V, KG, VG, DO, LSE2, DELTA, DQL, DQ, EB, ACTIVE, WLO, WHI, GIDX, GLOGW, GSLOT, LO, HI,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      num_heads, group, kv_heads, nq, nk, offset, first, row0, n_rows, c_blocks, num_e, chunk_blocks,
                      num_chunks, s_pad, win_width, scale,
                      CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr, NE_P: tl.constexpr):
    # dq of one selected block (as _sparse_kernel): its exact blocks' tiles and its chunk's
    # gathered columns, plus the LSH part _lsh_dq_kernel left in DQL; stored in q's dtype.
    jj, bh, b, h, kvh, j, rows, row_ok = _block_program(num_heads, group, first, nq, T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = scale * 1.4426950408889634
    q, do, lse2, delta = _grad_rows(Q, DO, LSE2, DELTA, b, h, bh, rows, row_ok, row0, n_rows, stride_qb, stride_qh,
                                    stride_qn, offs_d, HEAD_DIM)
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh
    dq = tl.zeros([T, HEAD_DIM], dtype=tl.float32)
    sel = bh * c_blocks + jj
    if tl.load(ACTIVE + sel) != 0:
        # The exact blocks' tiles in _sparse_kernel's order: the run every row sees whole
        # unmasked, then the rest masked.
        n_tiles = num_e * (T // BLOCK_N)
        n_whole = _whole_tiles(EB, sel, num_e, win_width, j, nk, offset, n_tiles, CAUSAL, T, BLOCK_N, NE_P)
        for t in range(0, n_whole):
            k, v, pad, _ = _exact_tile(K, V, EB, sel, num_e, win_width, t, rows, nk, offset, k_base, v_base,
                                       stride_kn, stride_vn, offs_n, offs_d, CAUSAL, T, BLOCK_N)
            dq = _tile_dq(dq, q, do, lse2, delta, k, v, pad, None, qk_scale, False, PRECISION)
        for t in range(n_whole, n_tiles):
            k, v, _, valid = _exact_tile(K, V, EB, sel, num_e, win_width, t, rows, nk, offset, k_base, v_base,
                                         stride_kn, stride_vn, offs_n, offs_d, CAUSAL, T, BLOCK_N)
            dq = _tile_dq(dq, q, do, lse2, delta, k, v, 0.0, valid, qk_scale, True, PRECISION)
        wlo = tl.load(WLO + j).to(tl.int32)
        whi = tl.load(WHI + j).to(tl.int32)
        lo = tl.load(LO + bh * nq + rows, mask=row_ok, other=0)
        hi = tl.load(HI + bh * nq + rows, mask=row_ok, other=0)
        g_base = ((b * kv_heads + kvh) * num_chunks + j // chunk_blocks) * s_pad
        for s0 in range(0, s_pad, BLOCK_N):
            k, v, valid, bias = _gathered_tile(KG, VG, GIDX, GLOGW, GSLOT, EB, sel, num_e, g_base + s0 + offs_n, wlo,
                                               whi, lo, hi, row_ok, offs_d, CAUSAL, HEAD_DIM, T)
            dq = _tile_dq(dq, q, do, lse2, delta, k, v, bias, valid, qk_scale, True, PRECISION)
    flat = bh * n_rows + rows - row0
    dq = dq * scale + tl.load(DQL + flat[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    tl.store(DQ + (bh * nq + rows)[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _exact_dkv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, OFFSETS, ENTRIES,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      num_heads, group, kv_heads, nq, nk, nkb, offset, first, row0, n_rows, c_blocks, scale,
                      CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # dk, dv of BLOCK_N keys of one key block of one (batch, KV head) from every selected
    # block of the group's heads that lists it among its exact blocks (ENTRIES[OFFSETS[kb]:
    # OFFSETS[kb + 1]], each g * c_blocks + jj); stored (every key of the launch once).
    TPB: tl.constexpr = T // BLOCK_N
    kt = tl.program_id(0)
    kb = kt // TPB
    cols = kb * T + (kt % TPB) * BLOCK_N + tl.arange(0, BLOCK_N)
    bkv, b, kvh, col_ok, offs_d, k, v, dk, dv = _key_tile(K, V, cols, nk, kv_heads, stride_kb, stride_kh, stride_kn,
                                                         stride_vb, stride_vh, stride_vn, HEAD_DIM, BLOCK_N)
    qk_scale = scale * 1.4426950408889634
    key = bkv * nkb + kb
    for i in range(tl.load(OFFSETS + key), tl.load(OFFSETS + key + 1)):
        entry = tl.load(ENTRIES + i)
        h = kvh * group + entry // c_blocks
        j = first + entry % c_blocks
        bh = b * num_heads + h
        for m0 in range(0, T, BLOCK_M):
            rows = j * T + m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < nq
            q, do, lse2, delta = _grad_rows(Q, DO, LSE2, DELTA, b, h, bh, rows, row_ok, row0, n_rows, stride_qb,
                                            stride_qh, stride_qn, offs_d, HEAD_DIM)
            valid = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + offset)
            dk, dv = _tile_dkv(dk, dv, q, do, lse2, delta, k, v, 0.0, valid, qk_scale, PRECISION)
    ptrs = (bkv * nk + cols)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + ptrs, dk * scale, mask=col_ok[:, None])
    tl.store(DV + ptrs, dv, mask=col_ok[:, None])


@triton.jit
def _lsh_dkv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, QORDER, KORDER, LO, HI, EB, RUNS,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn,
                    group, kv_heads, nq, nk, row0, n_rows, first, c_blocks, num_e, e0, scale,
                    HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr):
    # dk, dv of BLOCK_N sorted key slots of one (batch, KV head) from every tile of its
    # sorted rows (the group's heads together) whose ranges may reach them (the run RUNS[t]
    # of row tiles, _lsh_runs; rows whose ranges miss are masked), added into the exact
    # blocks' gradient (a key sits in one slot: the rows are this program's alone).
    kt = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    ks = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < nk
    offs_d = tl.arange(0, HEAD_DIM)
    cols, k, v = _sorted_kv(K, V, KORDER + bkv * nk, ks, k_ok, b * stride_kb + kvh * stride_kh,
                            b * stride_vb + kvh * stride_vh, stride_kn, stride_vn, offs_d)
    kblk = cols // T
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    n_tiles = tl.cdiv(nk, BLOCK_N)
    key = bkv * n_tiles + kt
    for tile in range(tl.load(RUNS + 2 * key), tl.load(RUNS + 2 * key + 1)):
        h, bh, rows, row_ok, lo, hi, busy, sel = _lsh_rows(QORDER, LO, HI, bkv, kvh, tile, nq, group,
                                                           row0, first, c_blocks, BLOCK_M, T)
        valid = _lsh_mask(EB, ks, kblk, lo, hi, busy, sel, num_e, e0)
        q, do, lse2, delta = _grad_rows(Q, DO, LSE2, DELTA, b, h, bh, rows, row_ok, row0, n_rows, stride_qb,
                                        stride_qh, stride_qn, offs_d, HEAD_DIM)
        dk, dv = _tile_dkv(dk, dv, q, do, lse2, delta, k, v, 0.0, valid, qk_scale, PRECISION)
    ptrs = (bkv * nk + cols)[:, None] * HEAD_DIM + offs_d[None, :]
    _add_into(DK, ptrs, dk * scale, k_ok[:, None])
    _add_into(DV, ptrs, dv, k_ok[:, None])


@triton.jit
def _gathered_dkv_kernel(Q, KG, VG, DO, LSE2, DELTA, DK, DV, EB, ACTIVE, WLO, WHI, GIDX, GLOGW, GSLOT, LO, HI,
                         stride_qb, stride_qh, stride_qn,
                         num_heads, group, kv_heads, nq, nk, first, row0, n_rows, c_blocks, num_e, chunk_blocks,
                         num_chunks, s_pad, scale,
                         CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # dk, dv of BLOCK_N gathered columns of one (batch, KV head, chunk) from every selected
    # block of the chunk of the group's heads (_gathered_tile's mask per block), summed on
    # chip, then one atomic add per column into the key it copies.
    st = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    sj = (bkv * num_chunks + c) * s_pad + st * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    k = tl.load(KG + sj[:, None] * HEAD_DIM + offs_d[None, :])
    v = tl.load(VG + sj[:, None] * HEAD_DIM + offs_d[None, :])
    j0 = tl.maximum(c * chunk_blocks, first)
    j1 = tl.minimum((c + 1) * chunk_blocks, first + c_blocks)
    for g in range(group):
        h = kvh * group + g
        bh = b * num_heads + h
        for j in range(j0, j1):
            sel = bh * c_blocks + j - first
            if tl.load(ACTIVE + sel) != 0:
                _, ok, slot, bias = _gathered_cols(GIDX, GLOGW, GSLOT, EB, sel, num_e, sj,
                                                   tl.load(WLO + j).to(tl.int32), tl.load(WHI + j).to(tl.int32),
                                                   CAUSAL, T)
                for m0 in range(0, T, BLOCK_M):
                    rows = j * T + m0 + tl.arange(0, BLOCK_M)
                    row_ok = rows < nq
                    lo = tl.load(LO + bh * nq + rows, mask=row_ok, other=0)
                    hi = tl.load(HI + bh * nq + rows, mask=row_ok, other=0)
                    q, do, lse2, delta = _grad_rows(Q, DO, LSE2, DELTA, b, h, bh, rows, row_ok, row0, n_rows,
                                                    stride_qb, stride_qh, stride_qn, offs_d, HEAD_DIM)
                    dk, dv = _tile_dkv(dk, dv, q, do, lse2, delta, k, v, bias[None, :],
                                       _outside_lsh(ok, slot, lo, hi, row_ok), qk_scale, PRECISION)
    idx = tl.load(GIDX + sj)
    used = tl.load(GLOGW + sj) > float("-inf")
    ptrs = (bkv * nk + idx)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.atomic_add(DK + ptrs, dk * scale, mask=used[:, None])
    tl.atomic_add(DV + ptrs, dv, mask=used[:, None])


def _prune(configs, named_args, **kwargs):
    # fp32 tiles take twice the shared memory: the smallest key tile only. HYPERATTN_AUTOTUNE=0
    # (the test suite): one config, as in kernels/attention.py, since each
    # tuned variant costs several compilations.
    tiled = all("BLOCK_N" in c.kwargs for c in configs)  # else the launch fixes the tiles
    if tiled and named_args.get("Q", named_args.get("QS")).dtype == torch.float32:
        smallest = min(c.kwargs["BLOCK_N"] for c in configs)
        configs = [c for c in configs if c.kwargs["BLOCK_N"] == smallest]
    # A key tile never spans two key blocks (the sparse kernel walks a block in whole tiles).
    block = kwargs.get("T", named_args.get("T"))
    if tiled and block is not None:
        configs = [c for c in configs if c.kwargs["BLOCK_N"] <= block] or configs[-1:]
    # Gathered columns come in whole tiles: a chunk's list (s_pad, a multiple of 64) in key tiles.
    s_pad = named_args.get("s_pad")
    if tiled and s_pad is not None:
        configs = [c for c in configs if s_pad % c.kwargs["BLOCK_N"] == 0] or configs[-1:]
    if os.environ.get("HYPERATTN_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    return configs


def _autotuned(kernel, configs, key, restore_value=None):
    # restore_value: arguments a launch updates in place, put back after each timed run.
    if triton.knobs.runtime.interpret:  # no timing without a GPU
        return triton.autotune(configs=configs[:1], key=key)(kernel)
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune},
                           restore_value=restore_value)(kernel)


_SPARSE = _autotuned(_sparse_kernel, [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                                      # (64 keys, 2 stages: two programs per SM, and 128 keys, 1 stage,
                                      # were tried: never the fastest at 131k on an H200.)
                                      for n, w, s in ((64, 8, 3), (128, 8, 2), (64, 4, 3), (32, 4, 2))],
                     ["HEAD_DIM", "CAUSAL", "T", "PRECISION", "NE_P", "s_pad"], restore_value=["OUT", "LSE"])
_LSH = _autotuned(_lsh_kernel, [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                                for m, n, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (32, 32, 4, 2), (64, 64, 4, 1),
                                                   (32, 64, 4, 1), (64, 32, 4, 2))],
                  ["HEAD_DIM", "T", "PRECISION"])


def _tiles(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


# The backward's launches, tuned per shape family. The first config of each is the one the
# tests run (HYPERATTN_AUTOTUNE=0). The LSH slots' dk/dv walks the runs of row tiles found
# for its tiles (_BWD), so only its warps and stages vary; the launches that add into dk/dv
# in place put them back after each timed run. Its tiles were measured (fwd+bwd, 131k
# causal, H100, one run): 64 rows x 32 slots 59.4 ms; 64 x 64 61.1; 128 x 64 60.5; 32 x 64
# 60.5 (a tile of sorted rows spans ~50 slots, so 32-slot tiles waste less).
_BWD = dict(BLOCK_M=64, BLOCK_N=32)
_TILE_SHAPES = ((64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2))
_KEY = ["HEAD_DIM", "CAUSAL", "T", "PRECISION"]
_GATHERED_KEY = _KEY + ["s_pad"]
_LSH_DQ = _autotuned(_lsh_dq_kernel, _tiles(((64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2))),
                     ["HEAD_DIM", "T", "PRECISION"])
_SPARSE_DQ = _autotuned(_sparse_dq_kernel, [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st)
                                            for n, w, st in ((64, 8, 2), (32, 4, 2), (64, 4, 2), (128, 8, 1))],
                        _GATHERED_KEY + ["NE_P"])
_EXACT_DKV = _autotuned(_exact_dkv_kernel, _tiles(_TILE_SHAPES), _KEY)
_LSH_DKV = _autotuned(_lsh_dkv_kernel,
                      [triton.Config({}, num_warps=w, num_stages=st) for w, st in ((4, 2), (8, 2), (4, 3))],
                      ["HEAD_DIM", "T", "PRECISION", "BLOCK_M", "BLOCK_N"], restore_value=["DK", "DV"])
_GATHERED_DKV = _autotuned(_gathered_dkv_kernel, _tiles(_TILE_SHAPES), _GATHERED_KEY, restore_value=["DK", "DV"])

class _Tables:
    """The selection as the kernels read it (int32, contiguous), built once per call and kept for the backward."""

    def __init__(self, k: Tensor, v: Tensor, plan: Plan, sel: Selection, lsh: Lsh):
        device = k.device
        self.g_idx, self.g_logw, self.g_slot, self.k_g, self.v_g, self.s_pad = _gathered(k, v, sel, lsh)
        self.num_chunks = sel.gather_idx.shape[2]
        self.c_blocks = sel.blocks.shape[2]
        self.num_e = sel.exact_blocks.shape[-1]
        # The window's entries come first in each block's exact blocks (exact_blocks); NE_P
        # sizes the block kernels' vector over them (_whole_tiles).
        self.win_width = min(plan.win_width, self.num_e)
        self.ne_p = triton.next_power_of_2(max(self.num_e, 1))
        # Causal, a row's LSH range ends before its block's window: the LSH passes skip the
        # window's entries.
        self.lsh_e0 = self.win_width if plan.causal else 0
        self.eb = sel.exact_blocks.int().contiguous()
        self.active = sel.active.to(torch.int8).contiguous()
        self.lo, self.hi = lsh.lo.int().contiguous(), lsh.hi.int().contiguous()
        # The plan's window tables (int64, on the device once per shape): no copy per call.
        self.win_lo, self.win_hi = plan.win_lo.to(device), plan.win_hi.to(device)
        self.q_order = lsh.q_order.int().contiguous()
        self.k_order = lsh.order.int().contiguous()


def _strides(q: Tensor, k: Tensor, v: Tensor) -> tuple:
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2))


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, tab: _Tables) -> tuple[Tensor, Tensor]:
    """Both launches: ``out (B, Hq, Nq, D)`` in q's dtype and ``lse`` fp32, full length.

    Rows before ``plan.first`` are left unset.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    t = plan.block
    out = torch.empty(bsz, hq, nq, dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(bsz, hq, nq, device=q.device, dtype=torch.float32)
    strides = _strides(q, k, v)
    precision = _precision(q.dtype)

    def grid(meta):  # LSH: tiles of each KV head's sorted rows (its query heads' together)
        return triton.cdiv(nq * (hq // hkv), meta["BLOCK_M"]), bsz * hkv

    _LSH[grid](q, k, v, out, lse, tab.q_order, tab.k_order, tab.lo, tab.hi, tab.eb, *strides, hq // hkv, hkv, nq, nk,
               plan.first * t, plan.first, tab.c_blocks, tab.num_e, tab.lsh_e0, scale, HEAD_DIM=dim, T=t,
               PRECISION=precision)
    if tab.c_blocks:
        _SPARSE[(tab.c_blocks, bsz * hq)](q, k, v, tab.k_g, tab.v_g, out, lse, tab.eb, tab.active, tab.win_lo,
                                          tab.win_hi, tab.g_idx, tab.g_logw, tab.g_slot, tab.lo, tab.hi, *strides, hq,
                                          hq // hkv, hkv, nq, nk, plan.offset, plan.first, tab.c_blocks, tab.num_e,
                                          plan.chunk_blocks, tab.num_chunks, tab.s_pad,
                                          tab.win_width, scale, CAUSAL=plan.causal, HEAD_DIM=dim, T=t,
                                          PRECISION=precision, NE_P=tab.ne_p)
    return out, lse


def _group_lists(local: Tensor, used: Tensor, hkv: int, n_local: int) -> tuple[Tensor, Tensor]:
    """For each (batch, KV head, key tile): the items of the group's heads that listed it, ``g * R + item``.

    ``local (B, Hq, R, W)``: each item's key tiles, numbered within its (batch, KV head)
    (``< n_local``; read where ``used``). Returns ``offsets`` and the entries, each key
    tile's ascending, grouped by one device sort (no host wait).
    """
    bsz, hq, items = local.shape[:3]
    group = hq // hkv
    device = local.device
    heads = torch.arange(hq, device=device)
    kv_key = (torch.arange(bsz, device=device).view(-1, 1) * hkv + heads // group).view(bsz, hq, 1, 1)
    n_keys = bsz * hkv * n_local
    keys = torch.where(used, kv_key * n_local + local.long(), n_keys).reshape(-1)  # n_keys: unused
    entries = ((heads % group).view(1, hq, 1, 1) * items + torch.arange(items, device=device).view(1, 1, items, 1))
    width = 1 << 32
    order = torch.sort(keys * width + entries.expand_as(used).reshape(-1)).values
    # Each key tile's first entry, found in the sorted keys (a count by scatter_add piles
    # atomics on the few tiles every row lists: 0.75 ms per list at 131k).
    offsets = torch.searchsorted(order, torch.arange(n_keys + 1, device=device) * width)
    return offsets.int(), (order % width).int()


def _exact_lists(plan: Plan, tab: _Tables, hkv: int) -> tuple[Tensor, Tensor]:
    """For each (batch, KV head, key block): the group's selected blocks that list it as exact, ``g * c + jj``."""
    return _group_lists(tab.eb, (tab.eb >= 0) & (tab.active != 0).unsqueeze(-1), hkv, plan.nkb)


def _lsh_runs(plan: Plan, tab: _Tables, nq: int, nk: int) -> Tensor:
    """For each (batch, KV head, tile of sorted key slots): the run ``[first, end)`` of the KV head's sorted row tiles
    that may reach it, ``(B, Hkv, key tiles, 2)`` int32.

    Sorted rows and sorted keys share one order (bucket, then position), so the row tiles
    whose spans reach a key tile form a run: it starts at the first tile whose running
    maximum of span ends passes the key tile's start, and ends after the last whose
    running minimum of span starts (from the right) lies before its end. Tiles of the run
    that miss the key tile are masked in the kernel. On random input at 131k (simulated on
    CPU) the runs hold 1.00x the (row tile, key tile) pairs that reach: ~20k per KV head,
    where the lists this replaced sorted every row tile's possible span (``LSH_TILES``
    blocks), 540k entries.
    """
    bm, bn = _BWD["BLOCK_M"], _BWD["BLOCK_N"]
    _, _, start, end = sorted_spans(tab.q_order.long(), tab.lo.long(), tab.hi.long(), bm, nk)
    bsz, hkv = start.shape[:2]
    reach = torch.cummax(end, -1).values.contiguous()
    begin = torch.cummin(start.flip(-1), -1).values.flip(-1).contiguous()
    edges = (torch.arange(triton.cdiv(nk, bn), device=start.device) * bn).expand(bsz, hkv, -1).contiguous()
    first = torch.searchsorted(reach, edges, right=True)
    last = torch.searchsorted(begin, edges + bn)
    return torch.stack([first, torch.maximum(first, last)], -1).int()


def attend_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
                    grad_lse: Tensor | None, scale: float, plan: Plan, tab: _Tables) -> tuple[Tensor, Tensor, Tensor]:
    """The five backward launches: dq (zero before ``plan.first``), dk, dv in the inputs' dtypes.

    ``out, lse, tab``: from :func:`attend_forward`; ``grad_out``: the gradient of every
    row, full-length (rows before ``plan.first`` are not read); ``grad_lse``: of the rows
    from ``plan.first`` on (``None``: zero).
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    t = plan.block
    row0 = min(plan.first * t, nq)
    n_rows = nq - row0
    device = q.device
    grad_out = grad_out.to(q.dtype).contiguous()  # one dtype for the products; rows at flat offsets
    # ds = P * (dP - delta), delta = rowsum(dO * out) minus the LSE's own gradient (d lse / d s
    # = P); the LSH dq launch stores it.
    delta = torch.empty(bsz, hq, n_rows, device=device, dtype=torch.float32)
    dlse = grad_lse.float().contiguous() if grad_lse is not None else delta
    lse2 = _bwd_lse2(lse[:, :, row0:])
    strides = _strides(q, k, v)
    precision = _precision(q.dtype)
    dq_lsh = torch.empty(bsz, hq, n_rows, dim, device=device, dtype=torch.float32)
    dq = torch.empty(bsz, hq, nq, dim, device=device, dtype=q.dtype)
    dq[:, :, :row0].zero_()
    dk = torch.empty(bsz, hkv, nk, dim, device=device, dtype=torch.float32)
    dv = torch.empty(bsz, hkv, nk, dim, device=device, dtype=torch.float32)
    meta = dict(HEAD_DIM=dim, T=t, PRECISION=precision)
    if n_rows == 0:  # every row exact elsewhere: this step has no gradient
        return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v)
    _LSH_DQ[lambda m: (triton.cdiv(group * nq, m["BLOCK_M"]), bsz * hkv)](
        q, k, v, grad_out, out, dlse, lse2, delta, dq_lsh, tab.q_order, tab.k_order, tab.lo, tab.hi, tab.eb, *strides,
        group, hkv, nq, nk, row0, n_rows, plan.first, tab.c_blocks, tab.num_e, tab.lsh_e0, scale,
        HAS_DLSE=grad_lse is not None,
        **meta)
    _SPARSE_DQ[(tab.c_blocks, bsz * hq)](
        q, k, v, tab.k_g, tab.v_g, grad_out, lse2, delta, dq_lsh, dq, tab.eb, tab.active, tab.win_lo, tab.win_hi,
        tab.g_idx, tab.g_logw, tab.g_slot, tab.lo, tab.hi, *strides, hq, group, hkv, nq, nk, plan.offset, plan.first,
        row0, n_rows, tab.c_blocks, tab.num_e, plan.chunk_blocks, tab.num_chunks, tab.s_pad,
        tab.win_width, scale, CAUSAL=plan.causal, NE_P=tab.ne_p, **meta)
    offsets, entries = _exact_lists(plan, tab, hkv)
    _EXACT_DKV[lambda m: (plan.nkb * (t // m["BLOCK_N"]), bsz * hkv)](
        q, k, v, grad_out, lse2, delta, dk, dv, offsets, entries, *strides, hq, group, hkv, nq, nk, plan.nkb,
        plan.offset, plan.first, row0, n_rows, tab.c_blocks, scale, CAUSAL=plan.causal, **meta)
    _LSH_DKV[(triton.cdiv(nk, _BWD["BLOCK_N"]), bsz * hkv)](
        q, k, v, grad_out, lse2, delta, dk, dv, tab.q_order, tab.k_order, tab.lo, tab.hi, tab.eb,
        _lsh_runs(plan, tab, nq, nk),
        *strides, group, hkv, nq, nk, row0, n_rows, plan.first, tab.c_blocks, tab.num_e, tab.lsh_e0, scale,
        **meta, **_BWD)
    _GATHERED_DKV[lambda m: (tab.s_pad // m["BLOCK_N"], bsz * hkv, tab.num_chunks)](
        q, tab.k_g, tab.v_g, grad_out, lse2, delta, dk, dv, tab.eb, tab.active, tab.win_lo, tab.win_hi, tab.g_idx,
        tab.g_logw, tab.g_slot, tab.lo, tab.hi, q.stride(0), q.stride(1), q.stride(2), hq, group, hkv, nq, nk,
        plan.first, row0, n_rows, tab.c_blocks, tab.num_e, plan.chunk_blocks, tab.num_chunks, tab.s_pad, scale,
        CAUSAL=plan.causal, **meta)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def attend_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh
                   ) -> tuple[Tensor, Tensor, _Tables]:
    """The forward launches of :func:`attend_triton` for an ``autograd.Function`` that owns every row.

    Returns the full-length ``out (B, Hq, Nq, D)`` in q's dtype and ``lse (B, Hq, Nq)``
    fp32, rows before ``plan.first`` left unset for the caller to fill, and the selection's
    tables, which :func:`attend_backward` reads. q, k, v must have unit stride in D.
    """
    with torch.no_grad():  # the selection's tables: constants, no graph
        tab = _Tables(k, v, plan, sel, lsh)
    out, lse = _forward(q, k, v, scale, plan, tab)
    return out, lse, tab


class _Attend(torch.autograd.Function):
    """The attention step with its gradient for the fixed selection (saves q, k, v, out, lse and the tables)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, plan, sel, lsh):
        out, lse, tab = attend_forward(q, k, v, scale, plan, sel, lsh)
        row0 = plan.first * plan.block
        ctx.set_materialize_grads(False)  # an unused output (often the LSE) costs no zero tensor
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.plan, ctx.tab = scale, plan, tab
        return out[:, :, row0:], lse[:, :, row0:]

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        row0 = ctx.plan.first * ctx.plan.block
        full = torch.zeros_like(out)  # the kernels read dO full-length
        if grad_out is not None:
            full[:, :, row0:] = grad_out
        dq, dk, dv = attend_backward(q, k, v, out, lse, full, grad_lse, ctx.scale, ctx.plan, ctx.tab)
        return dq, dk, dv, None, None, None, None


def attend_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh
                  ) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.structured.attend` in two Triton launches, differentiable for the fixed selection.

    Forward:

    1. every tile of bucket-sorted rows over its LSH key slots, stored at the rows'
       original positions in the output (inputs' dtype) and LSE;
    2. every selected query block over its exact blocks and its chunk's gathered columns
       (one online softmax), LSE-merged with (1) in place.

    Backward (five launches, recomputing P from the saved LSE; nothing of size N x keys is
    saved): dq of the LSH part, then of each block's exact blocks and gathered columns;
    dk and dv key-outer over the exact blocks, then the LSH slots, then the gathered
    columns. The log-weights and the selection are constants.
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _Attend.apply(q, k, v, scale, plan, sel, lsh)
    out, lse, _ = attend_forward(q, k, v, scale, plan, sel, lsh)
    row0 = plan.first * plan.block
    return out[:, :, row0:], lse[:, :, row0:]


@triton.jit
def _rows_kernel(Q, K, V, KG, VG, OUT, LSE, ROWS, BLOCKS, EB, WLO, WHI, GIDX, GLOGW, GSLOT, LO, HI, KORDER,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 num_heads, group, kv_heads, nq, nk, offset, c_blocks, num_rows, num_e, chunk_blocks, num_chunks,
                 s_pad, qk_scale,
                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, T: tl.constexpr, RP: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # A few rows of one selected block (the guard's probe rows): the block's exact blocks,
    # its chunk's gathered columns and each row's LSH range, one online softmax.
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // group
    sel = bh * c_blocks + i
    j = tl.load(BLOCKS + sel)
    offs_r = tl.arange(0, RP)
    rows = tl.load(ROWS + sel * num_rows + offs_r, mask=offs_r < num_rows, other=-1)
    row_ok = rows >= 0
    rows_c = tl.where(row_ok, rows, 0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = qk_scale * 1.4426950408889634
    q, acc, m_i, l_i, k_base, v_base = _start(Q, b, h, kvh, rows_c, row_ok, stride_qb, stride_qh, stride_qn,
                                              stride_kb, stride_kh, stride_vb, stride_vh, RP, HEAD_DIM)
    for e in range(num_e):
        kb = tl.load(EB + sel * num_e + e)
        if kb >= 0:
            for n0 in range(0, T, BLOCK_N):
                cols = kb * T + n0 + offs_n
                k_ok = cols < nk
                k, v = _kv_at(K, V, cols, k_ok, k_base, v_base, stride_kn, stride_vn, offs_d)
                valid = k_ok[None, :] & row_ok[:, None]
                if CAUSAL:
                    valid = valid & (cols[None, :] <= rows[:, None] + offset)
                acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, True, PRECISION)
    g_base = ((b * kv_heads + kvh) * num_chunks + j // chunk_blocks) * s_pad
    acc, m_i, l_i = _gathered_tiles(acc, m_i, l_i, q, KG, VG, GIDX, GLOGW, GSLOT, EB, WLO, WHI, LO, HI, sel, num_e, j,
                                    bh, rows_c, row_ok, nq, g_base, s_pad, offs_n, offs_d, qk_scale, CAUSAL, HEAD_DIM,
                                    T, BLOCK_N, PRECISION)
    # Each row's own LSH range (rows of one block lie in different buckets).
    for r in range(num_rows):
        row = tl.load(ROWS + sel * num_rows + r)
        r_lo = tl.load(LO + bh * nq + tl.maximum(row, 0))
        r_hi = tl.where(row >= 0, tl.load(HI + bh * nq + tl.maximum(row, 0)), 0)
        for n0 in range(r_lo, r_hi, BLOCK_N):
            ks = n0 + offs_n
            k_ok = ks < r_hi
            cols, k, v = _sorted_kv(K, V, KORDER + (b * kv_heads + kvh) * nk, ks, k_ok, k_base, v_base, stride_kn,
                                    stride_vn, offs_d)
            kblk = cols // T
            ok = k_ok
            for e in range(num_e):
                ok = ok & (kblk != tl.load(EB + sel * num_e + e))
            valid = ok[None, :] & (offs_r == r)[:, None]
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, True, PRECISION)
    out, lse = _normalised(acc, m_i, l_i)
    mask = offs_r < num_rows
    tl.store(OUT + (sel * num_rows + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask[:, None])
    tl.store(LSE + sel * num_rows + offs_r, lse, mask=mask)


_ROWS = _autotuned(_rows_kernel, [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                                  for n, w, s in ((64, 4, 2), (128, 4, 2), (32, 4, 2))],
                   ["HEAD_DIM", "CAUSAL", "T", "RP", "PRECISION", "s_pad"])


@triton.jit
def _gathered_kernel(GIDX, GLOGW, SLOT, K, V, OUT_IDX, OUT_LOGW, OUT_SLOT, KG, VG, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, kv_heads, num_chunks, nk, width, s_pad,
                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # BLOCK padded slots of one (batch, KV head, chunk): index (0 past width), log-weight
    # (-inf past width), the key's sorted LSH slot and its key and value rows.
    bkvc = tl.program_id(1).to(tl.int64)  # (b * kv_heads + kv head) * chunks + chunk
    bkv = bkvc // num_chunks
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    used = s < width
    idx = tl.load(GIDX + bkvc * width + s, mask=used, other=0)
    logw = tl.load(GLOGW + bkvc * width + s, mask=used, other=float("-inf"))
    out = bkvc * s_pad + s
    tl.store(OUT_IDX + out, idx.to(tl.int32))
    tl.store(OUT_LOGW + out, logw.to(tl.float32))
    tl.store(OUT_SLOT + out, tl.load(SLOT + bkv * nk + idx).to(tl.int32))
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + (b * stride_kb + kvh * stride_kh + idx * stride_kn)[:, None] + offs_d[None, :])
    v = tl.load(V + (b * stride_vb + kvh * stride_vh + idx * stride_vn)[:, None] + offs_d[None, :])
    tl.store(KG + out[:, None] * HEAD_DIM + offs_d[None, :], k)
    tl.store(VG + out[:, None] * HEAD_DIM + offs_d[None, :], v)


def _gathered(k: Tensor, v: Tensor, sel: Selection, lsh: Lsh):
    """Each chunk's gathered columns padded to whole tiles: indices, log-weights, sorted slots and K/V copies.

    Padded to 64 columns, not to the largest key tile (128): the default's 320 columns are
    five tiles of 64, where 384 would add a sixth of masked work; launches whose key tile
    does not divide ``s_pad`` are pruned (``_prune``). One launch (host time at 32k: the
    same in PyTorch took ~14 ops). k, v have unit stride in D.
    """
    bsz, hkv, nc, width = sel.gather_idx.shape
    dim = k.shape[-1]
    s_pad = max(1, math.ceil(width / 64)) * 64
    device = k.device
    g_idx = torch.empty(bsz, hkv, nc, s_pad, device=device, dtype=torch.int32)
    g_logw = torch.empty(bsz, hkv, nc, s_pad, device=device, dtype=torch.float32)
    g_slot = torch.empty(bsz, hkv, nc * s_pad, device=device, dtype=torch.int32)
    k_g = torch.empty(bsz, hkv, nc * s_pad, dim, device=device, dtype=k.dtype)
    v_g = torch.empty(bsz, hkv, nc * s_pad, dim, device=device, dtype=v.dtype)
    if g_idx.numel():
        _gathered_kernel[(s_pad // 64, bsz * hkv * nc)](
            sel.gather_idx.contiguous(), sel.gather_logw.contiguous(), lsh.slot.contiguous(), k, v, g_idx, g_logw,
            g_slot, k_g, v_g, *_strides(k, k, v)[3:], hkv, nc, k.shape[2], width, s_pad, HEAD_DIM=dim, BLOCK=64,
            num_warps=4)
    return g_idx, g_logw, g_slot, k_g, v_g, s_pad


def attend_rows_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh,
                       rows: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.structured.attend_rows` for given ``rows (B, Hq, c, R)`` (R <= 64), one launch."""
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    device = q.device
    c, r = rows.shape[2], rows.shape[3]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(bsz, hq, c, r, dim, device=device, dtype=torch.float32)
    lse = torch.empty(bsz, hq, c, r, device=device, dtype=torch.float32)
    if c == 0:
        return out, lse
    tab = _Tables(k, v, plan, sel, lsh)
    _ROWS[(c, bsz * hq)](q, k, v, tab.k_g, tab.v_g, out, lse, rows.int().contiguous(), sel.blocks.int().contiguous(),
                         tab.eb, tab.win_lo, tab.win_hi, tab.g_idx, tab.g_logw, tab.g_slot, tab.lo, tab.hi,
                         tab.k_order, *_strides(q, k, v), hq, hq // hkv, hkv, nq, nk, plan.offset, c, r, tab.num_e,
                         plan.chunk_blocks, tab.num_chunks, tab.s_pad, scale, CAUSAL=plan.causal, HEAD_DIM=dim,
                         T=plan.block, RP=max(16, triton.next_power_of_2(r)), PRECISION=_precision(q.dtype))
    return out, lse
