"""Triton attention kernels with an online softmax in fp32, the building blocks of the fast paths.

Two kernels, one per access pattern:

- :func:`range_attention`: every query row ``r`` (original order) attends the contiguous
  keys ``[lo[r], hi[r]]``. Causal diagonal blocks, block-diagonal exact attention and plain
  exact attention are all of this form. Tiles that lie inside every row's range run
  without masks.
- :func:`gathered_attention`: a tile of rows read through an index array (a sorted order)
  attends a run of keys read through another index array (the matching sorted key
  block), then a list of gathered columns carrying a per-column log-weight, each masked
  out for rows whose tile ``block_id`` equals the column's block id. This is the fused
  HyperAttention block + residual-sample step; the structured method's "LSH block +
  sinks/heavy columns (log-weight 0) + samples (log-weight ``log|stratum|``)" fits it too.

Both write ``out (B, Hq, Nq, D)`` and ``lse (B, Hq, Nq)`` fp32 at the rows' original
positions; rows flagged in ``prior`` are first combined with what an fp32 accumulator and
``lse`` already hold through the log-sum-exp (paper, ``add_self_attentions``), so pieces
that cover disjoint key sets of the same rows run one launch after another, in place, and
the last launch writes the result in the input dtype. Rows that see no key give
``out = 0`` and ``lse = -inf``.

Logits are kept in base 2 (``exp2``, scale premultiplied by ``log2(e)``), the usual
flash-attention trick; the stored ``lse`` is natural.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["range_attention", "gathered_attention", "range_attention_bwd", "gathered_attention_bwd", "range_key_tiles",
           "sample_chunks", "key_blocks", "key_block_width", "backward_delta", "TILE_ROWS", "SAMPLE_CHUNK_TILES"]

#: Most rows in one tile of :func:`gathered_attention` (the largest BLOCK_M it tunes over).
TILE_ROWS = 128

LOG2E = 1.4426950408889634


def _configs(shapes):
    # The interpreter cannot time configs: give it one.
    if triton.knobs.runtime.interpret:
        shapes = shapes[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    # fp32 tiles take twice the shared memory; large tiles then spill.
    if named_args["Q"].dtype == torch.float32:
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64]
        return small or configs[:1]
    return configs


@triton.jit
def _kv_at(K, V, cols, ok, k_base, v_base, stride_kn, stride_vn, offs_d):
    # The keys and values at positions cols of one (batch, KV head); zeros where not ok.
    k = tl.load(K + k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0)  # [N, D]
    v = tl.load(V + v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)  # [N, D]
    return k, v


@triton.jit
def _sorted_kv(K, V, ORDER, slots, ok, k_base, v_base, stride_kn, stride_vn, offs_d):
    # The keys and values at sorted slots (ORDER: a sort order of the KV head's positions):
    # their positions, keys and values.
    cols = tl.load(ORDER + slots, mask=ok, other=0)
    k, v = _kv_at(K, V, cols, ok, k_base, v_base, stride_kn, stride_vn, offs_d)
    return cols, k, v


@triton.jit
def _tile_update(acc, m_i, l_i, q, k, v, s_bias, valid, qk_scale, MASKED: tl.constexpr,
                 PRECISION: tl.constexpr):
    # One online-softmax step over a key tile; logits in base 2. Unmasked, s_bias is added
    # (one fused multiply-add): a scalar -inf drops a whole tile without a per-entry select.
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where(valid, s * qk_scale + s_bias, float("-inf"))
    else:
        s = s * qk_scale + s_bias
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; shifting by 0 keeps its weights at 0.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _lse_merge(prev_out, prev_lse, out, lse):
    # Two normalised parts over disjoint keys of the same rows, merged through their LSE;
    # rows empty in both stay empty (out 0, lse -inf).
    top = tl.maximum(prev_lse, lse)
    top = tl.where(top == float("-inf"), 0.0, top)
    w_prev = tl.exp(prev_lse - top)
    w_new = tl.exp(lse - top)
    total = w_prev + w_new
    none = total == 0.0
    total_safe = tl.where(none, 1.0, total)
    out = (prev_out * w_prev[:, None] + out * w_new[:, None]) / total_safe[:, None]
    return out, tl.where(none, float("-inf"), top + tl.log(total_safe))


@triton.jit
def _normalised(acc, m_i, l_i):
    # The online softmax's output and natural LSE; rows that saw no key: out 0, lse -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)


@triton.jit
def _finish(acc, m_i, l_i, ACC, OUT, LSE, PRIOR, rows, flat_rows, row_ok, offs_d, HEAD_DIM: tl.constexpr,
            HAS_PRIOR: tl.constexpr):
    # Normalise; where PRIOR flags a row, LSE-merge with what ACC/LSE already hold; store to OUT/LSE.
    out, lse = _normalised(acc, m_i, l_i)
    if HAS_PRIOR:
        merge = row_ok & (tl.load(PRIOR + rows, mask=row_ok, other=0) != 0)
        prev_lse = tl.load(LSE + flat_rows, mask=merge, other=float("-inf"))
        prev_out = tl.load(ACC + flat_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=merge[:, None],
                           other=0.0)
        out, lse = _lse_merge(prev_out, prev_lse, out, lse)
    o_ptrs = OUT + flat_rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + flat_rows, lse, mask=row_ok)


@triton.jit
def _range_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kn, stride_vn, lo, hi, start, end, t0, t1,
                 offs_n, offs_d, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 PRECISION: tl.constexpr):
    for t in range(t0, t1):
        cols = start + t * BLOCK_N + offs_n
        if MASKED:
            valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])
            k, v = _kv_at(K, V, cols, cols < end, k_base, v_base, stride_kn, stride_vn, offs_d)
        else:
            valid = None
            k = tl.load(K + k_base + cols[:, None] * stride_kn + offs_d[None, :])  # [BLOCK_N, D]
            v = tl.load(V + v_base + cols[:, None] * stride_vn + offs_d[None, :])  # [BLOCK_N, D]
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, MASKED, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _range_program(LO, HI, num_heads, group, nq, BLOCK_M: tl.constexpr):
    # The program's head, rows and their key ranges; key tiles span [start, end), from the
    # smallest lo to the largest hi of the rows that see a key.
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < nq
    lo = tl.load(LO + rows, mask=row_ok, other=0)
    hi = tl.load(HI + rows, mask=row_ok, other=-1)
    nonempty = row_ok & (lo <= hi)
    start = tl.min(tl.where(nonempty, lo, 2147483647), 0)
    end = tl.max(tl.where(nonempty, hi + 1, 0), 0)
    return b, h, h // group, rows, row_ok, lo, hi, tl.minimum(start, end), end


@triton.jit
def _range_attention_kernel(Q, K, V, ACC, OUT, LSE, PRIOR, LO, HI,
                            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                            stride_vb, stride_vh, stride_vn,
                            num_heads, group, nq, qk_scale,
                            HEAD_DIM: tl.constexpr, HAS_PRIOR: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h, kvh, rows, row_ok, lo, hi, start, end = _range_program(LO, HI, num_heads, group, nq, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Tiles inside every row's range need no mask.
    lo_max = tl.max(tl.where(row_ok, lo, 0), 0)
    hi_min = tl.min(tl.where(row_ok, hi, 2147483647), 0)
    num_tiles = tl.cdiv(end - start, BLOCK_N)
    t_full0 = tl.minimum(tl.cdiv(tl.maximum(lo_max - start, 0), BLOCK_N), num_tiles)
    t_full1 = tl.minimum(tl.maximum((hi_min + 1 - start) // BLOCK_N, t_full0), num_tiles)

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    qk_scale = qk_scale * 1.4426950408889634
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _range_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kn, stride_vn, lo, hi, start, end,
                                 0, t_full0, offs_n, offs_d, qk_scale, BLOCK_N, True, PRECISION)
    acc, m_i, l_i = _range_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kn, stride_vn, lo, hi, start, end,
                                 t_full0, t_full1, offs_n, offs_d, qk_scale, BLOCK_N, False, PRECISION)
    acc, m_i, l_i = _range_tiles(acc, m_i, l_i, q, K, V, k_base, v_base, stride_kn, stride_vn, lo, hi, start, end,
                                 t_full1, num_tiles, offs_n, offs_d, qk_scale, BLOCK_N, True, PRECISION)
    flat_rows = bh.to(tl.int64) * nq + rows
    _finish(acc, m_i, l_i, ACC, OUT, LSE, PRIOR, rows, flat_rows, row_ok, offs_d, HEAD_DIM, HAS_PRIOR)


@triton.jit
def _group_program(num_heads, kv_heads, group):
    # The program's table row and (batch, KV head, query head): grid (rows x group, B x Hkv),
    # the query heads of one KV head run as adjacent programs on the same row.
    index = tl.program_id(0) // group
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    h = kvh * group + tl.program_id(0) % group
    return index, b, kvh, h, b * num_heads + h, bkv


@triton.jit
def _tile_program(TILES, num_heads, kv_heads, group):
    # The program's (batch, KV head, query head) and its row of the tile table.
    tile, b, kvh, h, bh, bkv = _group_program(num_heads, kv_heads, group)
    row_start = tl.load(TILES + tile * 6 + 0)
    row_end = tl.load(TILES + tile * 6 + 1)
    key_start = tl.load(TILES + tile * 6 + 2)
    key_end = tl.load(TILES + tile * 6 + 3)
    piece = tl.load(TILES + tile * 6 + 4)
    block_id = tl.load(TILES + tile * 6 + 5)
    return b, kvh, h, bh, bkv, row_start, row_end, key_start, key_end, piece, block_id


@triton.jit
def _sample_tile(K, V, SIDX, SBLK, SLOGW, s_base, piece, max_samples, sj, num_samples, block_id, k_base, v_base,
                 stride_kn, stride_vn, offs_d):
    # A tile of a piece's gathered columns: their positions, which ones count for this tile
    # (not its own block), their log-weights and their keys and values.
    s_ok = sj < num_samples
    cols = tl.load(SIDX + s_base + sj, mask=s_ok, other=0)
    blk = tl.load(SBLK + s_base + sj, mask=s_ok, other=-1)
    logw = tl.load(SLOGW + piece * max_samples + sj, mask=s_ok, other=0.0)
    k, v = _kv_at(K, V, cols, s_ok, k_base, v_base, stride_kn, stride_vn, offs_d)
    return cols, s_ok & (blk != block_id), logw, k, v


@triton.jit
def _gathered_attention_kernel(Q, K, V, ACC, OUT, LSE, PRIOR, QIDX, KIDX, TILES, SIDX, SLOGW, SBLK, NSAMP,
                               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                               stride_vb, stride_vh, stride_vn,
                               num_heads, kv_heads, group, nq, nqidx, nkidx, max_samples, qk_scale,
                               HEAD_DIM: tl.constexpr, HAS_PRIOR: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Adjacent query heads share the tile's sorted key block: read from HBM once, then L2.
    b, kvh, h, bh, bkv, row_start, row_end, key_start, key_end, piece, block_id = _tile_program(
        TILES, num_heads, kv_heads, group)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = qk_scale * 1.4426950408889634
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh

    # A tile holds at most TILE_ROWS (128) rows; with a smaller BLOCK_M the program walks it in slices.
    for r0 in range(row_start, row_end, BLOCK_M):
        slots = r0 + tl.arange(0, BLOCK_M)
        row_ok = slots < row_end
        rows = tl.load(QIDX + bh * nqidx + slots, mask=row_ok, other=0)
        q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # The matching block of the sorted keys.
        for n0 in range(key_start, key_end, BLOCK_N):
            kslots = n0 + offs_n
            k_ok = kslots < key_end
            cols, k, v = _sorted_kv(K, V, KIDX + bkv * nkidx, kslots, k_ok, k_base, v_base, stride_kn, stride_vn,
                                    offs_d)
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, k_ok[None, :], qk_scale, True,
                                         PRECISION)
        # Gathered columns: log-weights added, the tile's own block masked (already counted).
        num_samples = tl.load(NSAMP + piece)
        s_base = (piece.to(tl.int64) * tl.num_programs(1) * group + bh) * max_samples
        for j0 in range(0, num_samples, BLOCK_N):
            sj = j0 + offs_n
            cols, keep, logw, k, v = _sample_tile(K, V, SIDX, SBLK, SLOGW, s_base, piece, max_samples, sj, num_samples,
                                                  block_id, k_base, v_base, stride_kn, stride_vn, offs_d)
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, (logw * 1.4426950408889634)[None, :],
                                         keep[None, :], qk_scale, True, PRECISION)
        _finish(acc, m_i, l_i, ACC, OUT, LSE, PRIOR, rows, bh * nq + rows, row_ok, offs_d, HEAD_DIM, HAS_PRIOR)


# --- backward -------------------------------------------------------------------------------------
#
# The forward's launches cover disjoint sets of (row, column) entries of one softmax per
# row, so the gradient splits the same way: with the final (merged) ``lse`` and
# ``delta = rowsum(dO * O) - dlse``, every scored entry ``z = scale * q.k + logw`` has
# ``P = exp(z - lse)`` and ``dz = P * (dO.v - delta)``, whichever launch scored it. Each
# backward launch recomputes its own entries (nothing of size N x N or N x budget is
# saved) and adds ``scale * dz @ k`` into its rows' dq and ``scale * dz^T @ q``, ``P^T @ dO``
# into dk, dv (fp32), which also sums the query heads of a KV head (GQA). Sample
# log-weights are constants of the function: they enter P only.
#
# Many query tiles score the same keys (an exact range's keys, a sorted key block, a
# piece's gathered columns), so dk and dv come from key-tile-outer launches that walk those
# rows and store once, as in flash-attention's backward: one atomic add per (query tile,
# key tile) into shared keys serialises in L2 and took 24 times the forward at 131k. dq
# comes from the row-outer launches, where every row belongs to one program (a plain
# read-modify-write).


@triton.jit
def _tile_ds(q, do, lse2, delta, k, v, s_bias, valid, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    # P and dz (unscaled) of one (row tile, key tile); unmasked, s_bias is added (as in _tile_update).
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], base 2 once scaled
    if MASKED:
        s = tl.where(valid, s * qk_scale + s_bias, float("-inf"))
    else:
        s = s * qk_scale + s_bias
    # lse2 is +inf on rows that see no key, so their P is 0 (not exp2(-inf - -inf) = NaN).
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    return p, p * (dp - delta[:, None])


@triton.jit
def _tile_dq(dq, q, do, lse2, delta, k, v, s_bias, valid, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    # dq (unscaled) of one key tile, accumulated (row-outer launches).
    p, ds = _tile_ds(q, do, lse2, delta, k, v, s_bias, valid, qk_scale, MASKED, PRECISION)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _tile_dkv(dk, dv, q, do, lse2, delta, k, v, s_bias, valid, qk_scale, PRECISION: tl.constexpr):
    # dk (unscaled) and dv of one key tile from one row tile, accumulated (key-outer launches).
    p, ds = _tile_ds(q, do, lse2, delta, k, v, s_bias, valid, qk_scale, True, PRECISION)
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _add_into(PTR, offsets, value, mask):
    # A plain read-modify-write: the rows are this program's alone in its launch.
    tl.store(PTR + offsets, tl.load(PTR + offsets, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _row_grad_inputs(Q, DO, LSE2, DELTA, b, h, bh, rows, row_ok, stride_qb, stride_qh, stride_qn, nq, offs_d,
                     HEAD_DIM: tl.constexpr):
    # One row tile's q, dO, base-2 LSE (+inf: no key) and delta.
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    flat_rows = bh * nq + rows
    do = tl.load(DO + flat_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE2 + flat_rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + flat_rows, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _key_tile(K, V, cols, nk, kv_heads, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    # A key-outer program's keys: (batch, KV head) from axis 1, the keys and values at cols,
    # and empty dk, dv accumulators.
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    col_ok = cols < nk
    offs_d = tl.arange(0, HEAD_DIM)
    k, v = _kv_at(K, V, cols, col_ok, b * stride_kb + kvh * stride_kh, b * stride_vb + kvh * stride_vh, stride_kn,
                  stride_vn, offs_d)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    return bkv, b, kvh, col_ok, offs_d, k, v, dk, dv


@triton.jit
def _range_attention_bwd_kernel(Q, K, V, DO, LSE2, DELTA, DQ, LO, HI,
                                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                                stride_vb, stride_vh, stride_vn,
                                num_heads, group, nq, scale,
                                HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dq of one row tile of one head (dk, dv: _range_attention_dkv_kernel).
    bh = tl.program_id(1)
    b, h, kvh, rows, row_ok, lo, hi, start, end = _range_program(LO, HI, num_heads, group, nq, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q, do, lse2, delta = _row_grad_inputs(Q, DO, LSE2, DELTA, b, h, bh.to(tl.int64), rows, row_ok, stride_qb,
                                          stride_qh, stride_qn, nq, offs_d, HEAD_DIM)
    qk_scale = scale * 1.4426950408889634
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for t in range(0, tl.cdiv(end - start, BLOCK_N)):
        cols = start + t * BLOCK_N + offs_n
        col_ok = cols < end
        valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])
        k, v = _kv_at(K, V, cols, col_ok, k_base, v_base, stride_kn, stride_vn, offs_d)
        dq = _tile_dq(dq, q, do, lse2, delta, k, v, 0.0, valid, qk_scale, True, PRECISION)
    _add_into(DQ, (bh.to(tl.int64) * nq + rows)[:, None] * HEAD_DIM + offs_d[None, :], dq * scale, row_ok[:, None])


@triton.jit
def _range_attention_dkv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, LO, HI, OFFSETS, ROW_TILES,
                                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                                stride_vb, stride_vh, stride_vn,
                                num_heads, kv_heads, group, nq, nk, scale,
                                HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dk, dv of one key tile of one (batch, KV head): the row tiles whose ranges reach it
    # (ROW_TILES[OFFSETS[t]:OFFSETS[t + 1]]), every query head of the group, accumulated on
    # chip and stored once (the tile is this program's alone in this launch).
    t = tl.program_id(0)
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    bkv, b, kvh, col_ok, offs_d, k, v, dk, dv = _key_tile(K, V, cols, nk, kv_heads, stride_kb, stride_kh, stride_kn,
                                                         stride_vb, stride_vh, stride_vn, HEAD_DIM, BLOCK_N)
    qk_scale = scale * 1.4426950408889634
    for i in range(tl.load(OFFSETS + t), tl.load(OFFSETS + t + 1)):
        rows = tl.load(ROW_TILES + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < nq
        lo = tl.load(LO + rows, mask=row_ok, other=0)
        hi = tl.load(HI + rows, mask=row_ok, other=-1)
        valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])
        for g in range(group):
            h = kvh * group + g
            q, do, lse2, delta = _row_grad_inputs(Q, DO, LSE2, DELTA, b, h, b * num_heads + h, rows, row_ok,
                                                  stride_qb, stride_qh, stride_qn, nq, offs_d, HEAD_DIM)
            dk, dv = _tile_dkv(dk, dv, q, do, lse2, delta, k, v, 0.0, valid, qk_scale, PRECISION)
    g_ptrs = (bkv * nk + cols)[:, None] * HEAD_DIM + offs_d[None, :]
    _add_into(DK, g_ptrs, dk * scale, col_ok[:, None])
    _add_into(DV, g_ptrs, dv, col_ok[:, None])


@triton.jit
def _gathered_attention_bwd_kernel(Q, K, V, DO, LSE2, DELTA, DQ, QIDX, KIDX, TILES, SIDX, SLOGW, SBLK,
                                   NSAMP, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                                   stride_vb, stride_vh, stride_vn,
                                   num_heads, kv_heads, group, nq, nqidx, nkidx, max_samples, scale,
                                   HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dq; same grid and walk as _gathered_attention_kernel.
    b, kvh, h, bh, bkv, row_start, row_end, key_start, key_end, piece, block_id = _tile_program(
        TILES, num_heads, kv_heads, group)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = scale * 1.4426950408889634
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh
    num_samples = tl.load(NSAMP + piece)
    s_base = (piece.to(tl.int64) * tl.num_programs(1) * group + bh) * max_samples
    for r0 in range(row_start, row_end, BLOCK_M):
        slots = r0 + tl.arange(0, BLOCK_M)
        row_ok = slots < row_end
        rows = tl.load(QIDX + bh * nqidx + slots, mask=row_ok, other=0)
        q, do, lse2, delta = _row_grad_inputs(Q, DO, LSE2, DELTA, b, h, bh, rows, row_ok, stride_qb, stride_qh,
                                              stride_qn, nq, offs_d, HEAD_DIM)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for n0 in range(key_start, key_end, BLOCK_N):
            kslots = n0 + offs_n
            k_ok = kslots < key_end
            cols, k, v = _sorted_kv(K, V, KIDX + bkv * nkidx, kslots, k_ok, k_base, v_base, stride_kn, stride_vn,
                                    offs_d)
            valid = row_ok[:, None] & k_ok[None, :]
            dq = _tile_dq(dq, q, do, lse2, delta, k, v, 0.0, valid, qk_scale, True, PRECISION)
        # The key block's dk, dv: _block_dkv_kernel; the gathered columns': _sample_dkv_kernel.
        for j0 in range(0, num_samples, BLOCK_N):
            sj = j0 + offs_n
            cols, keep, logw, k, v = _sample_tile(K, V, SIDX, SBLK, SLOGW, s_base, piece, max_samples, sj, num_samples,
                                                  block_id, k_base, v_base, stride_kn, stride_vn, offs_d)
            valid = row_ok[:, None] & keep[None, :]
            dq = _tile_dq(dq, q, do, lse2, delta, k, v, (logw * 1.4426950408889634)[None, :], valid, qk_scale, True,
                          PRECISION)
        _add_into(DQ, (bh * nq + rows)[:, None] * HEAD_DIM + offs_d[None, :], dq * scale, row_ok[:, None])


@triton.jit
def _tile_rows_dkv(dk, dv, Q, DO, LSE2, DELTA, ROW_SLOTS, TILES, tile, b, h, bh, keep, k, v, s_bias, qk_scale,
                   stride_qb, stride_qh, stride_qn, nq, offs_d, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    # dk, dv of a key tile (columns where keep) from the rows of one tile of the tile table
    # (sorted slots [row_start, row_end) of ROW_SLOTS).
    row_start = tl.load(TILES + tile * 6 + 0)
    row_end = tl.load(TILES + tile * 6 + 1)
    for r0 in range(row_start, row_end, BLOCK_M):
        slots = r0 + tl.arange(0, BLOCK_M)
        row_ok = slots < row_end
        rows = tl.load(ROW_SLOTS + slots, mask=row_ok, other=0)
        q, do, lse2, delta = _row_grad_inputs(Q, DO, LSE2, DELTA, b, h, bh, rows, row_ok, stride_qb, stride_qh,
                                              stride_qn, nq, offs_d, HEAD_DIM)
        valid = row_ok[:, None] & keep[None, :]
        dk, dv = _tile_dkv(dk, dv, q, do, lse2, delta, k, v, s_bias, valid, qk_scale, PRECISION)
    return dk, dv


@triton.jit
def _block_dkv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, QIDX, KIDX, TILES, BLOCKS,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      num_heads, kv_heads, group, nq, nk, nqidx, nkidx, scale,
                      HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dk, dv of BLOCK_N keys of one sorted key block of one (batch, KV head): the rows of
    # every tile on that block (BLOCKS: [first, last) tile rows of TILES) for every query
    # head of the group, accumulated on chip and stored once. A key sits in one block of
    # one piece per launch, so the tile is this program's alone.
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    tile0 = tl.load(BLOCKS + tl.program_id(0) * 2)
    tile1 = tl.load(BLOCKS + tl.program_id(0) * 2 + 1)
    key_start = tl.load(TILES + tile0 * 6 + 2)
    key_end = tl.load(TILES + tile0 * 6 + 3)
    n0 = key_start + tl.program_id(2) * BLOCK_N
    if n0 < key_end:
        offs_d = tl.arange(0, HEAD_DIM)
        kslots = n0 + tl.arange(0, BLOCK_N)
        k_ok = kslots < key_end
        cols, k, v = _sorted_kv(K, V, KIDX + bkv * nkidx, kslots, k_ok, b * stride_kb + kvh * stride_kh,
                                b * stride_vb + kvh * stride_vh, stride_kn, stride_vn, offs_d)
        qk_scale = scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for tile in range(tile0, tile1):
            for g in range(group):
                h = kvh * group + g
                bh = b * num_heads + h
                dk, dv = _tile_rows_dkv(dk, dv, Q, DO, LSE2, DELTA, QIDX + bh * nqidx, TILES, tile, b, h, bh, k_ok, k,
                                        v, 0.0, qk_scale, stride_qb, stride_qh, stride_qn, nq, offs_d, HEAD_DIM,
                                        PRECISION, BLOCK_M)
        g_ptrs = (bkv * nk + cols)[:, None] * HEAD_DIM + offs_d[None, :]
        _add_into(DK, g_ptrs, dk * scale, k_ok[:, None])
        _add_into(DV, g_ptrs, dv, k_ok[:, None])


@triton.jit
def _sample_dkv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, QIDX, TILES, CHUNKS, SIDX, SLOGW, SBLK, NSAMP,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn,
                       num_heads, kv_heads, group, nq, nk, nqidx, max_samples, scale,
                       HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dk, dv of BLOCK_N of one head's gathered columns in one piece, from a chunk of the
    # piece's tiles (CHUNKS: [first, last) tile rows of TILES, one piece each): the rows of
    # every tile scored against the columns, accumulated on chip, then one atomic add (the
    # chunks of a piece, and columns drawn twice, share keys).
    chunk, b, kvh, h, bh, bkv = _group_program(num_heads, kv_heads, group)
    tile0 = tl.load(CHUNKS + chunk * 2)
    tile1 = tl.load(CHUNKS + chunk * 2 + 1)
    piece = tl.load(TILES + tile0 * 6 + 4)
    num_samples = tl.load(NSAMP + piece)
    sj = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(2) * BLOCK_N < num_samples:
        offs_d = tl.arange(0, HEAD_DIM)
        s_base = (piece.to(tl.int64) * tl.num_programs(1) * group + bh) * max_samples
        # Each tile's own block is masked below, tile by tile.
        s_ok = sj < num_samples
        cols, _, logw, k, v = _sample_tile(K, V, SIDX, SBLK, SLOGW, s_base, piece, max_samples, sj, num_samples,
                                           0, b * stride_kb + kvh * stride_kh, b * stride_vb + kvh * stride_vh,
                                           stride_kn, stride_vn, offs_d)
        blk = tl.load(SBLK + s_base + sj, mask=s_ok, other=-1)
        bias = (logw * 1.4426950408889634)[None, :]
        qk_scale = scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for tile in range(tile0, tile1):
            keep = s_ok & (blk != tl.load(TILES + tile * 6 + 5))
            dk, dv = _tile_rows_dkv(dk, dv, Q, DO, LSE2, DELTA, QIDX + bh * nqidx, TILES, tile, b, h, bh, keep, k, v,
                                    bias, qk_scale, stride_qb, stride_qh, stride_qn, nq, offs_d, HEAD_DIM, PRECISION,
                                    BLOCK_M)
        g_ptrs = (bkv * nk + cols)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(DK + g_ptrs, dk * scale, mask=s_ok[:, None])
        tl.atomic_add(DV + g_ptrs, dv, mask=s_ok[:, None])


_RANGE_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)])
_GATHERED_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)])


def _tuned(kernel, configs):
    return triton.autotune(configs=configs, key=["HEAD_DIM", "HAS_PRIOR"],
                           prune_configs_by={"early_config_prune": _prune}, restore_value=["OUT", "LSE"])(kernel)


_KERNELS = {
    "range": (_tuned(_range_attention_kernel, _RANGE_CONFIGS), _range_attention_kernel, _RANGE_CONFIGS[0]),
    "gathered": (_tuned(_gathered_attention_kernel, _GATHERED_CONFIGS), _gathered_attention_kernel,
                 _GATHERED_CONFIGS[0]),
}


def _launch(name: str, grid, *args, **kwargs) -> None:
    # HYPERATTN_AUTOTUNE=0 skips tuning (first config): each tuned variant costs several
    # compilations, which dominates short runs such as the test suite.
    tuned, plain, first = _KERNELS[name]
    if os.environ.get("HYPERATTN_AUTOTUNE", "1") != "0":
        tuned[grid](*args, **kwargs)
    else:
        plain[grid](*args, **kwargs, **first.all_kwargs())


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 products so the kernels match the fp32 reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def range_attention(q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, acc: Tensor,
                    out: Tensor, lse: Tensor, prior: Tensor | None) -> None:
    """Row ``r`` of ``q (B, Hq, Nq, D)`` attends keys ``[lo[r], hi[r]]`` of ``k, v (B, Hkv, Nk, D)``.

    ``lo, hi: (Nq,)`` int32, shared by all heads (``lo > hi``: no key). Stores
    ``out (B, Hq, Nq, D)`` (any float dtype) and ``lse (B, Hq, Nq)`` fp32; rows flagged in
    ``prior: (Nq,)`` int8 are first LSE-merged with ``acc (B, Hq, Nq, D)`` fp32 and ``lse``
    (``out`` may be ``acc``). All buffers contiguous.

    Examples::

        >>> q = torch.randn(1, 4, 1000, 64, device="cuda"); k = v = torch.randn(1, 2, 1000, 64, device="cuda")
        >>> rows = torch.arange(1000, device="cuda", dtype=torch.int32)
        >>> out, lse = torch.empty_like(q), torch.empty(1, 4, 1000, device="cuda")
        >>> range_attention(q, k, v, torch.zeros_like(rows), rows, 0.125, out, out, lse, None)  # exact causal
    """
    bsz, hq, nq, dim = q.shape

    def grid(meta):
        return triton.cdiv(nq, meta["BLOCK_M"]), bsz * hq

    _launch(
        "range", grid, q, k, v, acc, out, lse, prior, lo, hi,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hq, hq // k.shape[1], nq, scale,
        HEAD_DIM=dim, HAS_PRIOR=prior is not None, PRECISION=_precision(q.dtype),
    )


def gathered_attention(q: Tensor, k: Tensor, v: Tensor, q_index: Tensor, k_index: Tensor, tiles: Tensor,
                       sample_index: Tensor, sample_logw: Tensor, sample_block: Tensor, num_samples: Tensor,
                       scale: float, acc: Tensor, out: Tensor, lse: Tensor, prior: Tensor | None) -> None:
    """Fused sorted-block + gathered-column attention over a table of row tiles.

    ``q (B, Hq, Nq, D)``, ``k, v (B, Hkv, Nk, D)``; ``q_index (B*Hq, Sq)`` and
    ``k_index (B*Hkv, Sk)`` map slots of a sorted order to original positions.
    ``tiles (T, 6)`` int32 rows ``[row_start, row_end, key_start, key_end, piece, block_id]``:
    query slots ``[row_start, row_end)`` (at most :data:`TILE_ROWS`) attend key slots
    ``[key_start, key_end)`` and the gathered columns of ``piece``:
    ``sample_index, sample_block (P, B*Hq, M)`` (original key positions and their block
    ids), ``sample_logw (P, M)`` fp32 natural log-weights, ``num_samples (P,)`` int32 valid
    columns. A column whose block id equals the tile's ``block_id`` is skipped. Stores and
    merges like :func:`range_attention`, at the rows' original positions.

    Examples::

        >>> # rows 0-127 (identity order) attend keys 0-63 and columns 100, 200 (weight e^1.5)
        >>> q = torch.randn(1, 1, 128, 64, device="cuda"); k = v = torch.randn(1, 1, 256, 64, device="cuda")
        >>> q_ident = torch.arange(128, device="cuda").reshape(1, -1)
        >>> k_ident = torch.arange(256, device="cuda").reshape(1, -1)
        >>> tiles = torch.tensor([[0, 128, 0, 64, 0, 0]], dtype=torch.int32, device="cuda")
        >>> cols = torch.tensor([[[100, 200]]], device="cuda")
        >>> out, lse = torch.empty_like(q), torch.empty(1, 1, 128, device="cuda")
        >>> gathered_attention(q, k, v, q_ident, k_ident, tiles, cols, torch.full((1, 2), 1.5, device="cuda"),
        ...                    torch.ones_like(cols, dtype=torch.int32), torch.tensor([2], dtype=torch.int32,
        ...                    device="cuda"), 0.125, out, out, lse, None)
    """
    bsz, hq, nq, dim = q.shape
    grid = (tiles.shape[0] * (hq // k.shape[1]), bsz * k.shape[1])
    _launch(
        "gathered", grid, q, k, v, acc, out, lse, prior, q_index, k_index, tiles, sample_index, sample_logw,
        sample_block, num_samples,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hq, k.shape[1], hq // k.shape[1], nq, q_index.shape[-1], k_index.shape[-1], sample_index.shape[-1],
        scale, HEAD_DIM=dim, HAS_PRIOR=prior is not None, PRECISION=_precision(q.dtype),
    )


# One block shape for the backward launches: they add into dq, dk, dv in place, which
# would have to be reset between autotuning trials, and 64 x 64 tiles fit every head dim
# and dtype (fp32 included) in shared memory.
_BWD_META = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)

#: Most tiles of one piece a program of the gathered columns' dk, dv walks (atomic adds
#: per column: the piece's tiles over this).
SAMPLE_CHUNK_TILES = 32


@triton.jit
def _delta_kernel(DO, OUT, DLSE, DELTA, n_rows, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  ROWS: tl.constexpr):
    # ROWS rows of rowsum(dO * out) - dlse, products and sum in fp32 (one read of each).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < n_rows
    at = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    do = tl.load(DO + at, mask=ok[:, None], other=0.0).to(tl.float32)
    out = tl.load(OUT + at, mask=ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(do * out, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=ok)


def backward_delta(grad_out: Tensor, out: Tensor, grad_lse: Tensor | None) -> Tensor:
    """``rowsum(grad_out * out) - grad_lse`` in fp32, ``(B, H, N)``, in one launch.

    ``grad_out``, ``out``: ``(B, H, N, D)`` contiguous, D a power of two; ``grad_lse``:
    ``(B, H, N)`` or ``None`` (zero). Through PyTorch this took fp32 copies of both inputs,
    their product and a sum: ~14 GB of traffic at 131k x 32 heads x 128.
    """
    bsz, heads, n, dim = out.shape
    delta = torch.empty(bsz, heads, n, device=out.device, dtype=torch.float32)
    rows = bsz * heads * n
    dlse = grad_lse.float().contiguous() if grad_lse is not None else delta
    _delta_kernel[(triton.cdiv(rows, 64),)](grad_out, out, dlse, delta, rows, HAS_DLSE=grad_lse is not None,
                                           HEAD_DIM=dim, ROWS=64)
    return delta


def _bwd_lse2(lse: Tensor) -> Tensor:
    # Base-2 LSE for the kernels; rows that see no key get +inf, which makes their P zero.
    return torch.where(torch.isinf(lse), float("inf"), lse * LOG2E).contiguous()


def range_key_tiles(lo: Tensor, hi: Tensor, nk: int) -> tuple[Tensor, Tensor]:
    """Which row tiles of :func:`range_attention_bwd` reach each key tile: ``offsets (T + 1,)``, ``row_tiles`` int32.

    Key tile ``t`` (keys ``[64 t, 64 t + 64)``) is reached by row tiles
    ``row_tiles[offsets[t]:offsets[t + 1]]`` (rows ``[64 i, 64 i + 64)``), ascending. Built on
    the host from ``lo, hi (Nq,)``, once per plan; returned on their device.
    """
    bm, bn = _BWD_META["BLOCK_M"], _BWD_META["BLOCK_N"]
    lo_c, hi_c = lo.cpu().long(), hi.cpu().long()
    nq = lo_c.numel()
    num_rt, num_kt = triton.cdiv(nq, bm), triton.cdiv(nk, bn)
    pad = num_rt * bm - nq
    lo_c = torch.nn.functional.pad(lo_c, (0, pad), value=0)
    hi_c = torch.nn.functional.pad(hi_c, (0, pad), value=-1)
    some = lo_c <= hi_c
    start = torch.where(some, lo_c, nk).reshape(num_rt, bm).amin(1)
    end = torch.where(some, hi_c + 1, 0).reshape(num_rt, bm).amax(1)  # a tile's keys: [start, end)
    first = torch.arange(num_kt) * bn
    tiles = torch.nonzero(start < end).squeeze(1)
    s_t, e_t = start[tiles], end[tiles]
    if bool((s_t[1:] >= s_t[:-1]).all() and (e_t[1:] >= e_t[:-1]).all()):
        # Monotone ranges (the plans' causal segments and blocks): the row tiles reaching a
        # key tile are a run, found by two binary searches (1M keys: ms, not seconds).
        a = torch.searchsorted(e_t, first, right=True)
        counts = (torch.searchsorted(s_t, first + bn, right=False) - a).clamp(min=0)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        # Entry j of key tile t: run start a[t] plus its place j - offsets[t] in the run.
        row_tiles = tiles[torch.repeat_interleave(a - offsets[:-1], counts) + torch.arange(int(offsets[-1]))]
    else:
        counts, found = [], []
        step = max(1, (1 << 24) // max(1, num_rt))  # bounds the (key tiles x row tiles) table at 1M
        for t0 in range(0, num_kt, step):
            lead = first[t0:t0 + step]
            reach = (start[None, :] < lead[:, None] + bn) & (end[None, :] > lead[:, None])
            counts.append(reach.sum(1))
            found.append(reach.nonzero()[:, 1])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(counts).cumsum(0)])
        row_tiles = torch.cat(found)
    return offsets.int().to(lo.device), row_tiles.int().to(lo.device)


def _tile_runs(tiles: Tensor, columns: list[int], most: int) -> Tensor:
    # Runs of at most `most` consecutive rows of a tile table equal in `columns`: (R, 2) int32 [first, last).
    keys = [tuple(row) for row in tiles[:, columns].cpu().tolist()]
    runs, first = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[first] or i - first == most:
            runs.append((first, i))
            first = i
    return torch.tensor(runs, dtype=torch.int32).reshape(-1, 2).to(tiles.device)


def sample_chunks(tiles: Tensor) -> Tensor:
    """Runs of at most :data:`SAMPLE_CHUNK_TILES` consecutive rows of a tile table that share a piece: ``(C, 2)`` int32.

    ``tiles`` as in :func:`gathered_attention` (host or device); each row ``[first, last)``.
    """
    return _tile_runs(tiles, [4], SAMPLE_CHUNK_TILES)


def key_blocks(tiles: Tensor) -> Tensor:
    """The runs of consecutive rows of a tile table on one sorted key block: ``(K, 2)`` int32 ``[first, last)``."""
    return _tile_runs(tiles, [2, 3, 4], len(tiles))


def key_block_width(tiles: Tensor) -> int:
    """The widest sorted key block of a tile table (0 for none); reads ``tiles`` on the host."""
    return int((tiles[:, 3] - tiles[:, 2]).max()) if tiles.shape[0] else 0


def range_attention_bwd(q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float, grad_out: Tensor,
                        lse: Tensor, delta: Tensor, dq: Tensor, dk: Tensor, dv: Tensor,
                        key_tiles: tuple[Tensor, Tensor] | None = None) -> None:
    """Adds the gradients of the entries :func:`range_attention` scored (same ``lo, hi``) into ``dq, dk, dv``.

    ``grad_out (B, Hq, Nq, D)`` contiguous; ``lse (B, Hq, Nq)`` fp32, the final log-sum-exp of
    every row (all launches merged); ``delta (B, Hq, Nq)`` fp32, ``rowsum(grad_out * out)``
    minus the gradient of ``lse``; ``dq (B, Hq, Nq, D)`` and ``dk, dv (B, Hkv, Nk, D)``
    contiguous fp32 accumulators (dk and dv summed over the query heads of each KV head).
    ``key_tiles``: :func:`range_key_tiles` of ``lo, hi`` (``None``: built here, which reads
    ``lo, hi`` on the host).

    Examples::

        >>> q = torch.randn(1, 4, 1000, 64, device="cuda"); k = v = torch.randn(1, 2, 1000, 64, device="cuda")
        >>> rows = torch.arange(1000, device="cuda", dtype=torch.int32)
        >>> out, lse = torch.empty_like(q), torch.empty(1, 4, 1000, device="cuda")
        >>> range_attention(q, k, v, torch.zeros_like(rows), rows, 0.125, out, out, lse, None)
        >>> do = torch.randn_like(q); delta = (do * out).sum(-1)
        >>> dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        >>> range_attention_bwd(q, k, v, torch.zeros_like(rows), rows, 0.125, do, lse, delta, dq, dk, dv)
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    offsets, row_tiles = range_key_tiles(lo, hi, nk) if key_tiles is None else key_tiles
    lse2 = _bwd_lse2(lse)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    _range_attention_bwd_kernel[(triton.cdiv(nq, _BWD_META["BLOCK_M"]), bsz * hq)](
        q, k, v, grad_out, lse2, delta, dq, lo, hi, *strides, hq, hq // hkv, nq, scale,
        HEAD_DIM=dim, PRECISION=_precision(q.dtype), **_BWD_META,
    )
    _range_attention_dkv_kernel[(offsets.numel() - 1, bsz * hkv)](
        q, k, v, grad_out, lse2, delta, dk, dv, lo, hi, offsets, row_tiles, *strides, hq, hkv, hq // hkv, nq, nk,
        scale, HEAD_DIM=dim, PRECISION=_precision(q.dtype), **_BWD_META,
    )


def gathered_attention_bwd(q: Tensor, k: Tensor, v: Tensor, q_index: Tensor, k_index: Tensor, tiles: Tensor,
                           sample_index: Tensor, sample_logw: Tensor, sample_block: Tensor, num_samples: Tensor,
                           scale: float, grad_out: Tensor, lse: Tensor, delta: Tensor, dq: Tensor, dk: Tensor,
                           dv: Tensor, chunks: Tensor | None = None, blocks: Tensor | None = None,
                           block_keys: int | None = None) -> None:
    """Adds the gradients of the entries :func:`gathered_attention` scored (same tables) into ``dq, dk, dv``.

    Tables as in :func:`gathered_attention`; ``grad_out``, ``lse``, ``delta`` and the fp32
    accumulators as in :func:`range_attention_bwd`. The samples' log-weights are constants.
    ``chunks``, ``blocks``, ``block_keys``: :func:`sample_chunks`, :func:`key_blocks` and
    :func:`key_block_width` of ``tiles`` (``None``: found here, on the host).
    """
    bsz, hq, nq, dim = q.shape
    hkv, group = k.shape[1], hq // k.shape[1]
    chunks = sample_chunks(tiles) if chunks is None else chunks
    blocks = key_blocks(tiles) if blocks is None else blocks
    block_keys = key_block_width(tiles) if block_keys is None else block_keys
    lse2 = _bwd_lse2(lse)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    _gathered_attention_bwd_kernel[(tiles.shape[0] * group, bsz * hkv)](
        q, k, v, grad_out, lse2, delta, dq, q_index, k_index, tiles, sample_index, sample_logw,
        sample_block, num_samples, *strides, hq, hkv, group, nq, q_index.shape[-1], k_index.shape[-1],
        sample_index.shape[-1], scale, HEAD_DIM=dim, PRECISION=_precision(q.dtype), **_BWD_META,
    )
    width = sample_index.shape[-1]
    if blocks.shape[0]:
        _block_dkv_kernel[(blocks.shape[0], bsz * hkv, triton.cdiv(block_keys, _BWD_META["BLOCK_N"]))](
            q, k, v, grad_out, lse2, delta, dk, dv, q_index, k_index, tiles, blocks, *strides, hq, hkv, group, nq,
            k.shape[2], q_index.shape[-1], k_index.shape[-1], scale, HEAD_DIM=dim, PRECISION=_precision(q.dtype),
            **_BWD_META,
        )
    if width and chunks.shape[0]:
        _sample_dkv_kernel[(chunks.shape[0] * group, bsz * hkv, triton.cdiv(width, _BWD_META["BLOCK_N"]))](
            q, k, v, grad_out, lse2, delta, dk, dv, q_index, tiles, chunks, sample_index, sample_logw, sample_block,
            num_samples, *strides, hq, hkv, group, nq, k.shape[2], q_index.shape[-1], width, scale,
            HEAD_DIM=dim, PRECISION=_precision(q.dtype), **_BWD_META,
        )
