"""Triton engine of the structured method's attention step: two launches, no copies of q, k, v.

:func:`attend_triton` computes :func:`hyperattn.reference.structured.attend` (forward only):

1. ``_lsh_kernel``: every tile of bucket-sorted rows over the sorted key slots its rows'
   ranges span, keys read through the sort order, masked to each row's range minus its
   exact blocks; its output and LSE stored at the rows' original positions, in the
   output tensor itself (in the inputs' dtype);
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

from ..reference.selection import Lsh, Plan, Selection
from .attention import _kv_at, _lse_merge, _normalised, _precision, _sorted_kv, _tile_update

__all__ = ["attend_triton", "attend_rows_triton"]


@triton.jit
def _start(Q, b, h, kvh, rows, row_ok, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_vb, stride_vh,
           M: tl.constexpr, HEAD_DIM: tl.constexpr):
    # A program's query rows, its KV head's offsets and an empty online softmax.
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    acc = tl.zeros([M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    return q, acc, m_i, l_i, b * stride_kb + kvh * stride_kh, b * stride_vb + kvh * stride_vh


@triton.jit
def _gathered_tiles(acc, m_i, l_i, q, KG, VG, GIDX, GLOGW, GSLOT, EB, WLO, WHI, LO, HI, sel, num_e, j, bh, rows,
                    row_ok, nq, g_base, s_pad, offs_n, offs_d, qk_scale, CAUSAL: tl.constexpr,
                    HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # The chunk's gathered columns that lie in block j's complement (candidates not among
    # its exact blocks), log-weights as a bias, minus each row's LSH range (those keys are
    # exact in the LSH pass).
    wlo = tl.load(WLO + j)
    whi = tl.load(WHI + j)
    lo = tl.load(LO + bh * nq + rows, mask=row_ok, other=0)
    hi = tl.load(HI + bh * nq + rows, mask=row_ok, other=0)
    for s0 in range(0, s_pad, BLOCK_N):
        sj = g_base + s0 + offs_n
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
        k = tl.load(KG + sj[:, None] * HEAD_DIM + offs_d[None, :])
        v = tl.load(VG + sj[:, None] * HEAD_DIM + offs_d[None, :])
        valid = ok[None, :] & row_ok[:, None] & ((slot[None, :] < lo[:, None]) | (slot[None, :] >= hi[:, None]))
        bias = tl.where(ok, logw, 0.0) * 1.4426950408889634
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, bias[None, :], valid, qk_scale, True, PRECISION)
    return acc, m_i, l_i


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
    jj = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // group
    j = first + jj
    rows = j * T + tl.arange(0, T)
    row_ok = rows < nq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = qk_scale * 1.4426950408889634
    q, acc, m_i, l_i, k_base, v_base = _start(Q, b, h, kvh, rows, row_ok, stride_qb, stride_qh, stride_qn, stride_kb,
                                              stride_kh, stride_vb, stride_vh, T, HEAD_DIM)
    sel = bh * c_blocks + jj
    if tl.load(ACTIVE + sel) != 0:
        # The exact blocks' tiles, the entries after the window's first (the top blocks),
        # then the window's in ascending order: under exact_blocks' layout the tiles that
        # need a mask (the diagonal's, a ragged last block) come last. The leading run of
        # tiles every row sees whole (or padding, -1, whose scores a scalar -inf drops) is
        # one unmasked loop the compiler can pipeline; the rest is masked.
        TPB: tl.constexpr = T // BLOCK_N
        n_tiles = num_e * TPB
        tiles = tl.arange(0, NE_P * TPB)
        kb_t = tl.load(EB + sel * num_e + (tiles // TPB + win_width) % tl.maximum(num_e, 1), mask=tiles < n_tiles,
                       other=-1)
        c0_t = kb_t * T + (tiles % TPB) * BLOCK_N
        whole = c0_t + BLOCK_N <= nk
        if CAUSAL:
            whole = whole & (c0_t + BLOCK_N - 1 <= j * T + offset)
        n_whole = tl.min(tl.where((tiles < n_tiles) & (kb_t >= 0) & ~whole, tiles, n_tiles), 0)
        for t in range(0, n_whole):
            kb = tl.load(EB + sel * num_e + (t // TPB + win_width) % num_e)
            cols = tl.maximum(kb, 0) * T + (t % TPB) * BLOCK_N + offs_n
            k, v = _kv_at(K, V, cols, cols < nk, k_base, v_base, stride_kn, stride_vn, offs_d)
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, kb >= 0, qk_scale, True, PRECISION)
        for t in range(n_whole, n_tiles):
            kb = tl.load(EB + sel * num_e + (t // TPB + win_width) % num_e)
            cols = tl.maximum(kb, 0) * T + (t % TPB) * BLOCK_N + offs_n
            k_ok = (cols < nk) & (kb >= 0)
            k, v = _kv_at(K, V, cols, k_ok, k_base, v_base, stride_kn, stride_vn, offs_d)
            valid = k_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + offset)
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, True, PRECISION)
        g_base = ((b * kv_heads + kvh) * num_chunks + j // chunk_blocks) * s_pad
        acc, m_i, l_i = _gathered_tiles(acc, m_i, l_i, q, KG, VG, GIDX, GLOGW, GSLOT, EB, WLO, WHI, LO, HI, sel, num_e,
                                        j, bh, rows, row_ok, nq, g_base, s_pad, offs_n, offs_d, qk_scale, CAUSAL,
                                        HEAD_DIM, T, BLOCK_N, PRECISION)
    # LSE-merged with the LSH part the first launch left in OUT/LSE (contiguous rows here,
    # where the LSH pass's rows are scattered), in place: the one store of the result.
    out, lse = _normalised(acc, m_i, l_i)
    flat = bh * nq + rows
    o_ptrs = OUT + flat[:, None] * HEAD_DIM + offs_d[None, :]
    prev_lse = tl.load(LSE + flat, mask=row_ok, other=float("-inf"))
    prev = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    out, lse = _lse_merge(prev, prev_lse, out, lse)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + flat, lse, mask=row_ok)


@triton.jit
def _lsh_kernel(Q, K, V, OUT, LSE, QORDER, KORDER, LO, HI, EB,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                num_heads, group, kv_heads, nq, nk, row0, first, c_blocks, num_e, qk_scale,
                HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    # A tile of bucket-sorted rows over the sorted key slots their ranges span (keys read
    # through the sort order: sorted copies of K and V cost more to make, 0.9 ms at 131k,
    # than they saved here, 0.3), minus each row's exact blocks; stored at the rows'
    # original positions, where the sparse kernel merges it with the rest.
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // group
    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    s_ok = slots < nq
    rows = tl.load(QORDER + bh * nq + slots, mask=s_ok, other=0)
    row_ok = s_ok & (rows >= row0)
    lo = tl.load(LO + bh * nq + rows, mask=row_ok, other=0)
    hi = tl.load(HI + bh * nq + rows, mask=row_ok, other=0)
    busy = row_ok & (lo < hi)
    start = tl.min(tl.where(busy, lo, 2147483647), 0)
    end = tl.max(tl.where(busy, hi, 0), 0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = qk_scale * 1.4426950408889634
    q, acc, m_i, l_i, k_base, v_base = _start(Q, b, h, kvh, rows, row_ok, stride_qb, stride_qh, stride_qn, stride_kb,
                                              stride_kh, stride_vb, stride_vh, BLOCK_M, HEAD_DIM)
    sel = bh * c_blocks + tl.where(busy, rows // T - first, 0)
    # No test for key tiles that meet no row's range (a tile straddling two buckets): such
    # gaps are rare, and a branch around the product would stop the loop's pipelining.
    for n0 in range(start, end, BLOCK_N):
        ks = n0 + offs_n
        k_ok = ks < end
        cols, k, v = _sorted_kv(K, V, KORDER + (b * kv_heads + kvh) * nk, ks, k_ok, k_base, v_base, stride_kn,
                                stride_vn, offs_d)
        kblk = cols // T
        valid = (ks[None, :] >= lo[:, None]) & (ks[None, :] < hi[:, None])
        # Each row's exact blocks, reloaded per key tile (from L1/L2): holding them as one
        # [rows, blocks] tile and comparing in 3-D measured slower (4.2 against 3.9 ms at 131k).
        for e in range(num_e):
            eb = tl.load(EB + sel * num_e + e, mask=busy, other=-1)
            valid = valid & (kblk[None, :] != eb[:, None])
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, True, PRECISION)
    out, lse = _normalised(acc, m_i, l_i)
    flat = bh * nq + rows
    tl.store(OUT + flat[:, None] * HEAD_DIM + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + flat, lse, mask=row_ok)


def _prune(configs, named_args, **kwargs):
    # fp32 tiles take twice the shared memory: the smallest key tile only. HYPERATTN_AUTOTUNE=0
    # (the test suite): one config, as in kernels/attention.py, since each
    # tuned variant costs several compilations.
    if named_args["Q"].dtype == torch.float32:
        smallest = min(c.kwargs["BLOCK_N"] for c in configs)
        configs = [c for c in configs if c.kwargs["BLOCK_N"] == smallest]
    # A key tile never spans two key blocks (the sparse kernel walks a block in whole tiles).
    block = kwargs.get("T", named_args.get("T"))
    if block is not None:
        configs = [c for c in configs if c.kwargs["BLOCK_N"] <= block] or configs[-1:]
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
                     ["HEAD_DIM", "CAUSAL", "T", "PRECISION", "NE_P"], restore_value=["OUT", "LSE"])
_LSH = _autotuned(_lsh_kernel, [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                                for m, n, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (32, 32, 4, 2), (64, 64, 4, 1),
                                                   (32, 64, 4, 1), (64, 32, 4, 2))],
                  ["HEAD_DIM", "T", "PRECISION"])


def attend_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh
                  ) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.structured.attend` in two Triton launches (forward only).

    1. every tile of bucket-sorted rows over its LSH key slots, stored at the rows'
       original positions in the output (inputs' dtype) and LSE;
    2. every selected query block over its exact blocks and its chunk's gathered columns
       (one online softmax), LSE-merged with (1) in place.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    device = q.device
    t = plan.block
    c_blocks = sel.blocks.shape[2]
    num_e = sel.exact_blocks.shape[-1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g_idx32, g_logw, g_slot, k_g, v_g, s_pad = _gathered(k, v, sel, lsh)
    nc = sel.gather_idx.shape[2]
    eb = sel.exact_blocks.int().contiguous()
    active = sel.active.to(torch.int8).contiguous()
    lo, hi = lsh.lo.int().contiguous(), lsh.hi.int().contiguous()
    win_lo, win_hi = plan.win_lo.to(device=device, dtype=torch.int32), plan.win_hi.to(device=device, dtype=torch.int32)
    out = torch.empty(bsz, hq, nq, dim, device=device, dtype=q.dtype)
    lse = torch.empty(bsz, hq, nq, device=device, dtype=torch.float32)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    precision = _precision(q.dtype)
    q_order = lsh.q_order.int().contiguous()
    k_order = lsh.order.int().contiguous()
    row0 = plan.first * t

    def grid(meta):
        return triton.cdiv(nq, meta["BLOCK_M"]), bsz * hq

    _LSH[grid](q, k, v, out, lse, q_order, k_order, lo, hi, eb, *strides, hq, hq // hkv, hkv, nq, nk,
               row0, plan.first, c_blocks, num_e, scale, HEAD_DIM=dim, T=t, PRECISION=precision)
    if c_blocks:
        _SPARSE[(c_blocks, bsz * hq)](q, k, v, k_g, v_g, out, lse, eb, active, win_lo, win_hi, g_idx32, g_logw,
                                      g_slot, lo, hi, *strides, hq, hq // hkv, hkv, nq, nk, plan.offset, plan.first,
                                      c_blocks, num_e, plan.chunk_blocks, nc, s_pad, min(plan.win_width, num_e),
                                      scale, CAUSAL=plan.causal, HEAD_DIM=dim, T=t, PRECISION=precision,
                                      NE_P=triton.next_power_of_2(max(num_e, 1)))
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
                   ["HEAD_DIM", "CAUSAL", "T", "RP", "PRECISION"])


def _gathered(k: Tensor, v: Tensor, sel: Selection, lsh: Lsh):
    """Each chunk's gathered columns padded to whole tiles: indices, log-weights, sorted slots and K/V copies."""
    bsz, hkv, nc, width = sel.gather_idx.shape
    dim = k.shape[-1]
    s_pad = max(1, math.ceil(width / 128)) * 128
    g_idx = torch.nn.functional.pad(sel.gather_idx, (0, s_pad - width))  # (B, Hkv, C, S_pad)
    g_logw = torch.nn.functional.pad(sel.gather_logw, (0, s_pad - width), value=float("-inf")).float().contiguous()
    flat_idx = g_idx.reshape(bsz, hkv, nc * s_pad)
    rows = flat_idx.unsqueeze(-1).expand(-1, -1, -1, dim)
    k_g, v_g = k.gather(2, rows).contiguous(), v.gather(2, rows).contiguous()
    b_ix = torch.arange(bsz, device=k.device).view(-1, 1, 1)
    g_slot = lsh.slot[b_ix, torch.arange(hkv, device=k.device).view(1, -1, 1), flat_idx].int().contiguous()
    return g_idx.int().contiguous(), g_logw, g_slot, k_g, v_g, s_pad


def attend_rows_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh,
                       rows: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.structured.attend_rows` for given ``rows (B, Hq, c, R)`` (R <= 64), one launch."""
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    device = q.device
    c, r = rows.shape[2], rows.shape[3]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g_idx, g_logw, g_slot, k_g, v_g, s_pad = _gathered(k, v, sel, lsh)
    out = torch.empty(bsz, hq, c, r, dim, device=device, dtype=torch.float32)
    lse = torch.empty(bsz, hq, c, r, device=device, dtype=torch.float32)
    if c == 0:
        return out, lse
    win_lo, win_hi = plan.win_lo.to(device=device, dtype=torch.int32), plan.win_hi.to(device=device, dtype=torch.int32)
    _ROWS[(c, bsz * hq)](q, k, v, k_g, v_g, out, lse, rows.int().contiguous(), sel.blocks.int().contiguous(),
                         sel.exact_blocks.int().contiguous(), win_lo, win_hi, g_idx, g_logw, g_slot,
                         lsh.lo.int().contiguous(), lsh.hi.int().contiguous(), lsh.order.int().contiguous(),
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                         v.stride(0), v.stride(1), v.stride(2),
                         hq, hq // hkv, hkv, nq, nk, plan.offset, c, r, sel.exact_blocks.shape[-1], plan.chunk_blocks,
                         sel.gather_idx.shape[2], s_pad, scale, CAUSAL=plan.causal, HEAD_DIM=dim, T=plan.block,
                         RP=max(16, triton.next_power_of_2(r)), PRECISION=_precision(q.dtype))
    return out, lse
