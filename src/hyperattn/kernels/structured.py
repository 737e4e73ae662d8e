"""The structured method on the GPU (mirrors :mod:`hyperattn.reference.structured`), same function for the same draws.

The selection (heavy columns, block scores, exact sets, LSH blocks, residual samples) is
the reference's own PyTorch code: it works on index lists of a few hundred keys per query
block and key-block tables, O(N^2 / 4096) per head, and runs on the GPU as it is. The
attention over the selection, the part that touches ``Nq x (keys per query) x D``, is one
Triton kernel, :func:`structured_block_attention`; exact rows (the prefix before
``min_seq_len`` and heads the guard runs exactly) go through
:func:`~hyperattn.kernels.attention.range_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import structured as ref
from .attention import _finish, _precision, _tile_update, range_attention

__all__ = ["block_scores", "structured_block_attention", "exact_lse", "structured_forward"]


@triton.jit
def _head(num_heads, group):
    # Axis 1 of every grid here is batch x query head: the flat index, batch, head, KV head.
    bh = tl.program_id(1).to(tl.int64)
    h = bh % num_heads
    return bh, bh // num_heads, h, h // group


@triton.jit
def _program(BLOCKS, num_heads, group):
    # Axis 0 indexes the chunk's query blocks: (slot in the chunk, query block, head indices).
    sel = tl.program_id(0)
    bh, b, h, kvh = _head(num_heads, group)
    return sel, tl.load(BLOCKS + sel), bh, b, h, kvh


@triton.jit
def _structured_kernel(Q, K, V, OUT, LSE, BLOCKS, EIDX, ECNT, SIDX, SLOGW, HITS,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn,
                       num_heads, group, nq, nk, r0, num_sel, width, num_samples, num_words, qk_scale,
                       CAUSAL: tl.constexpr, HAS_HITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (query block, batch x head): the block's rows are contiguous in Q.
    sel, blk, bh, b, h, kvh = _program(BLOCKS, num_heads, group)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = r0 + blk * BLOCK_M + offs_m
    row_ok = rows < nq
    if CAUSAL:
        limit = rows + (nk - nq)
    else:
        limit = rows * 0 + (nk - 1)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    qk_scale = qk_scale * 1.4426950408889634
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh
    slot = bh * num_sel + sel
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # The exact set E_j (key order), keys each row sees.
    count = tl.load(ECNT + slot)
    for n0 in range(0, count, BLOCK_N):
        j = n0 + offs_n
        ok = j < count
        cols = tl.load(EIDX + slot * width + j, mask=ok, other=0)
        k = tl.load(K + k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        valid = ok[None, :] & (cols[None, :] <= limit[:, None])
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, True, PRECISION)

    # Residual samples with their log-weights; a sample in the row's own LSH block is masked.
    for n0 in range(0, num_samples, BLOCK_N):
        j = n0 + offs_n
        ok = j < num_samples
        cols = tl.load(SIDX + slot * num_samples + j, mask=ok, other=0)
        logw = tl.load(SLOGW + slot * num_samples + j, mask=ok, other=float("-inf"))
        keep = ok & (logw > float("-inf"))
        if HAS_HITS:  # bit j of word n0 // 64: sample n0 + j is in this row's LSH block
            word = tl.load(HITS + (slot * BLOCK_M + offs_m) * num_words + n0 // 64)
            keep2 = keep[None, :] & (((word[:, None] >> offs_n[None, :].to(tl.int64)) & 1) == 0)
        else:
            keep2 = keep[None, :]
        k = tl.load(K + k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=keep[:, None], other=0.0)
        v = tl.load(V + v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=keep[:, None], other=0.0)
        bias = tl.where(keep, logw, 0.0) * 1.4426950408889634
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, bias[None, :], keep2, qk_scale, True,
                                     PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    out_rows = slot * BLOCK_M + offs_m
    tl.store(OUT + out_rows[:, None] * HEAD_DIM + offs_d[None, :], out)
    tl.store(LSE + out_rows, lse)


@triton.jit
def _lsh_kernel(Q, K, V, OUT, LSE, ONES, BLOCKS, PERM, FIRST, LOK, ORDER,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                num_heads, kv_heads, group, nq, nk, r0, num_rows, qk_scale,
                SPAN: tl.constexpr, QB: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # Rows sorted by the first slot of their LSH block in the bucket-sorted key order: the
    # blocks of one tile overlap, so the tile reads its keys once and scores them with tl.dot.
    t = tl.program_id(0)
    bh, b, h, kvh = _head(num_heads, group)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    i = t * BLOCK_M + offs_m
    ok_m = i < num_rows
    slot = tl.load(PERM + bh * num_rows + i, mask=ok_m, other=0)  # row slot in (blocks x QB) order
    first = tl.load(FIRST + bh * num_rows + slot, mask=ok_m, other=0)
    blk = tl.load(BLOCKS + slot // QB, mask=ok_m, other=0)
    rows = r0 + blk * QB + slot % QB
    row_ok = ok_m & (rows < nq)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    qk_scale = qk_scale * 1.4426950408889634
    k_base = b * stride_kb + kvh * stride_kh
    v_base = b * stride_vb + kvh * stride_vh
    order_base = (b * kv_heads + kvh) * nk
    lo = tl.min(tl.where(ok_m, first, 2147483647), 0)
    hi = tl.max(tl.where(ok_m, first + SPAN, 0), 0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        slots = n0 + offs_n
        s_ok = slots < hi
        keys = tl.load(ORDER + order_base + slots, mask=s_ok, other=0)
        k = tl.load(K + k_base + keys[:, None] * stride_kn + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        v = tl.load(V + v_base + keys[:, None] * stride_vn + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        pos = slots[None, :] - first[:, None]
        inside = (pos >= 0) & (pos < SPAN) & ok_m[:, None] & s_ok[None, :]
        lok = tl.load(LOK + (bh * num_rows + slot)[:, None] * SPAN + pos, mask=inside, other=0)
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, inside & (lok != 0), qk_scale, True, PRECISION)
    # LSE-merge with what the main pass wrote for these rows.
    _finish(acc, m_i, l_i, OUT, OUT, LSE, ONES, slot, bh * num_rows + slot, ok_m, offs_d, HEAD_DIM, True)


@triton.jit
def _pooled_tile(KP, kp_base, qg, n0, nkb, row_last, g_ok, scale, offs_n, offs_d, KB: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    # Key blocks [n0, n0 + BLOCK_N): their indices, which exist, the group queries' scaled
    # logits against their pooled keys (tf32x3: fp32-level accuracy), and which each group sees.
    kbi = n0 + offs_n
    kb_ok = kbi < nkb
    kp = tl.load(KP + kp_base + kbi[:, None] * HEAD_DIM + offs_d[None, :], mask=kb_ok[:, None], other=0.0)
    s = tl.dot(qg, tl.trans(kp), input_precision="tf32x3") * scale
    seen = (kbi[None, :] * KB <= row_last[:, None]) & g_ok[:, None] & kb_ok[None, :]
    return kbi, kb_ok, s, seen


@triton.jit
def _block_score_kernel(Q, KP, OUT, BLOCKS, stride_qb, stride_qh, stride_qn, num_heads, kv_heads, group, nq, nk,
                        nkb, r0, num_sel, scale, CAUSAL: tl.constexpr, QB: tl.constexpr, G: tl.constexpr,
                        BLOCK_G: tl.constexpr, KB: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (query block, batch x head): the block's group-mean queries against every
    # pooled key, a masked softmax per group (two passes), summed over the groups.
    sel, blk, bh, b, h, kvh = _program(BLOCKS, num_heads, group)
    start = r0 + blk * QB
    offs_r = tl.arange(0, QB)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start + offs_r
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                mask=(rows < nq)[:, None], other=0.0).to(tl.float32)  # rows past Nq are zero vectors
    avg = tl.where(offs_r[None, :] // G == offs_g[:, None], 1.0 / G, 0.0)  # [BLOCK_G, QB]
    # tf32x3: fp32-level accuracy on tensor cores (as the hashing kernel).
    qg = tl.dot(avg, q, input_precision="tf32x3")  # [BLOCK_G, D] group means
    row_pos = start + G * offs_g + G - 1
    g_ok = (offs_g < QB // G) & (row_pos - G + 1 < nq)
    if CAUSAL:
        row_last = row_pos + (nk - nq)
    else:
        row_last = row_pos * 0 + (nk - 1)
    kp_base = (b * kv_heads + kvh) * nkb * HEAD_DIM
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    for n0 in range(0, nkb, BLOCK_N):
        kbi, kb_ok, s, seen = _pooled_tile(KP, kp_base, qg, n0, nkb, row_last, g_ok, scale, offs_n, offs_d, KB,
                                           HEAD_DIM)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    out_base = (bh * num_sel + sel) * nkb
    for n0 in range(0, nkb, BLOCK_N):
        kbi, kb_ok, s, seen = _pooled_tile(KP, kp_base, qg, n0, nkb, row_last, g_ok, scale, offs_n, offs_d, KB,
                                           HEAD_DIM)
        p = tl.where(seen, tl.exp(s - lse[:, None]), 0.0)
        tl.store(OUT + out_base + kbi, tl.sum(p, 0), mask=kb_ok)


def block_scores(q: Tensor, k_pool: Tensor, nk: int, scale: float, causal: bool, r0: int, blocks: Tensor,
                 budget) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.structured.block_scores` in one launch (same contract, fp32-level accuracy)."""
    bsz, hq, nq, dim = q.shape
    hkv, nkb = k_pool.shape[1], k_pool.shape[2]
    qb, kb, g = budget.query_block, budget.key_block, budget.score_group
    blocks = blocks.to(device=q.device)
    c = len(blocks)
    out = torch.empty(bsz, hq, c, nkb, device=q.device, dtype=torch.float32)
    block_g = max(16, triton.next_power_of_2(qb // g))
    _block_score_kernel[(c, bsz * hq)](
        q, k_pool.float().contiguous(), out, blocks.to(torch.int32), q.stride(0), q.stride(1), q.stride(2),
        hq, hkv, hq // hkv, nq, nk, nkb, r0, c, scale,
        CAUSAL=causal, QB=qb, G=g, BLOCK_G=block_g, KB=kb, HEAD_DIM=dim, BLOCK_N=64, num_warps=4,
    )
    # The (group, key block) pairs scored, as the reference counts them.
    start = r0 + qb * blocks
    row_pos = start.unsqueeze(-1) + g * torch.arange(qb // g, device=q.device) + g - 1
    row_last = row_pos + (nk - nq) if causal else torch.full_like(row_pos, nk - 1)
    seen = torch.clamp(torch.div(row_last, kb, rounding_mode="floor") + 1, 0, nkb) * (row_pos - g + 1 < nq)
    return out, seen.sum().double()


def _sample_hits(sel: ref.Selection) -> tuple[Tensor, Tensor, Tensor]:
    """Samples sorted by key per block, their log-weights, and per row a bit mask of the samples in its LSH block.

    Returns ``sample_idx, sample_logw (B, Hq, c, m)`` and ``hits (B, Hq, c, qb, ceil(m / 64))``
    int64: bit ``j`` of word ``w`` set when sample ``64 w + j`` is one of the row's LSH keys
    that count (``lsh_ok``). Hits are rare, so they are found per LSH key (binary search in
    the sorted samples) and set sparsely.
    """
    samples, order = torch.sort(sel.sample_idx, dim=-1)
    logw = sel.sample_logw.gather(-1, order)
    bsz, hq, c, qb, span = sel.lsh_idx.shape
    m = samples.shape[-1]
    words = max(1, -(-m // 64))
    keys = sel.lsh_idx.reshape(bsz, hq, c, qb * span)
    lo = torch.searchsorted(samples, keys)
    hi = torch.searchsorted(samples, keys, right=True)
    found = (hi > lo) & sel.lsh_ok.reshape(keys.shape)
    hits = torch.zeros(bsz * hq * c * qb * words, dtype=torch.int64, device=samples.device)
    where = found.nonzero()  # (H, 4): b, h, block, row * span + l
    if len(where):
        count = (hi - lo)[found]
        each = torch.repeat_interleave(torch.arange(len(where), device=samples.device), count)
        first = torch.cumsum(count, 0) - count
        slot = lo[found][each] + torch.arange(len(each), device=samples.device) - first[each]
        b, h, blk, flat = where[each].unbind(-1)
        row = ((b * hq + h) * c + blk) * qb + flat // span
        # Distinct samples of one row set distinct bits: the sum is their OR.
        hits.scatter_add_(0, row * words + slot // 64, torch.ones_like(slot) << (slot % 64))
    return samples, logw, hits.reshape(bsz, hq, c, qb, words)


def _main_pass(q, k, v, scale, causal, r0, query_block, sel, num_warps=4):
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    c = len(sel.blocks)
    in_set = sel.exact_idx < ref._BIG
    eidx = torch.where(in_set, sel.exact_idx, 0).to(torch.int32).contiguous()
    ecnt = in_set.sum(-1).to(torch.int32).contiguous()
    if sel.lsh_idx is None:
        samples, logw, hits = sel.sample_idx, sel.sample_logw, None
    else:
        samples, logw, hits = _sample_hits(sel)
    sidx = samples.to(torch.int32).contiguous()
    slogw = logw.float().contiguous()
    out = torch.empty(bsz, hq, c, query_block, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(bsz, hq, c, query_block, device=q.device, dtype=torch.float32)
    blocks = sel.blocks.to(device=q.device, dtype=torch.int32)
    _structured_kernel[(c, bsz * hq)](
        q, k, v, out, lse, blocks, eidx, ecnt, sidx, slogw, sidx if hits is None else hits,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hq, hq // k.shape[1], nq, nk, r0, c, eidx.shape[-1], sidx.shape[-1], 1 if hits is None else hits.shape[-1],
        scale, CAUSAL=causal, HAS_HITS=hits is not None, HEAD_DIM=dim, BLOCK_M=query_block, BLOCK_N=64,
        PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=2,
    )
    return out, lse


def _lsh_pass(q, k, v, scale, r0, query_block, blocks, out, lse, first, lok, order):
    """Every row's LSH block in one launch, LSE-merged in place into ``out``/``lse``.

    ``out (B, Hq, nsel, qb, D)`` and ``lse (B, Hq, nsel, qb)`` fp32, as the main pass wrote them.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    num_rows = first.shape[2] * first.shape[3]
    first = first.reshape(bsz * hq, num_rows)
    perm = torch.argsort(first, dim=-1).to(torch.int32).contiguous()
    first = first.to(torch.int32).contiguous()
    lok = lok.to(torch.int8).reshape(bsz * hq, num_rows, -1).contiguous()
    order = order.to(torch.int32).contiguous()
    ones = torch.ones(num_rows, dtype=torch.int8, device=q.device)
    block_m = 64
    _lsh_kernel[(triton.cdiv(num_rows, block_m), bsz * hq)](
        q, k, v, out, lse, ones, blocks.to(device=q.device, dtype=torch.int32), perm, first, lok, order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hq, hkv, hq // hkv, nq, nk, r0, num_rows, scale,
        SPAN=lok.shape[-1], QB=query_block, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=64, PRECISION=_precision(q.dtype),
        num_warps=4, num_stages=2,
    )
    return out, lse


class _BlockAttention:
    """The attention steps of :func:`hyperattn.reference.structured.structured_attention` on the kernels.

    Every chunk of query blocks runs the main pass (exact set + samples) at once; the LSH
    blocks of all rows of the call run in one pass at the end, when rows from every part of
    the sequence can share key tiles.
    """

    # The kernels never materialise (row, key) scores, so the selection takes much larger
    # chunks of query blocks than the PyTorch path: fewer launches, ~1 GB per table at most.
    chunk_elements = 1 << 28
    rows_times_keys = False
    block_scores = staticmethod(block_scores)

    def __call__(self, q, k, v, scale, causal, r0, query_block, sel, ctx):
        if sel.lsh_idx is not None:
            ctx.setdefault("first", []).append(sel.lsh_first)
            ctx.setdefault("ok", []).append(sel.lsh_ok)
            ctx["order"] = sel.lsh_order
        return _main_pass(q, k, v, scale, causal, r0, query_block, sel)

    def finish(self, q, k, v, scale, r0, query_block, blocks, out, lse, ctx):
        if "first" not in ctx:
            return out, lse
        return _lsh_pass(q, k, v, scale, r0, query_block, blocks, out, lse, torch.cat(ctx["first"], dim=2),
                         torch.cat(ctx["ok"], dim=2), ctx["order"])


def structured_block_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, r0: int,
                               query_block: int, sel: ref.Selection) -> tuple[Tensor, Tensor]:
    """Step 5 of the structured method for the blocks of ``sel``: the main pass, then the LSH pass.

    Same contract as :func:`hyperattn.reference.structured.attend_blocks`: ``q (B, Hq, Nq, D)``,
    ``k, v (B, Hkv, Nk, D)`` in any float dtype; returns ``out (B, Hq, c, qb, D)`` and
    ``lse (B, Hq, c, qb)`` fp32 (rows past ``Nq`` are padding).
    """
    attend, ctx = _BlockAttention(), {}
    out, lse = attend(q, k, v, scale, causal, r0, query_block, sel, ctx)
    return attend.finish(q, k, v, scale, r0, query_block, sel.blocks, out, lse, ctx)


def exact_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """Exact attention through :func:`range_attention`: ``out`` and ``lse`` fp32, like :func:`attention_lse`."""
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    rows = torch.arange(nq, device=q.device, dtype=torch.int32)
    lo = torch.zeros_like(rows)
    hi = rows + (nk - nq) if causal else torch.full_like(rows, nk - 1)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(bsz, hq, nq, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(bsz, hq, nq, device=q.device, dtype=torch.float32)
    range_attention(q.contiguous(), k, v, lo, hi.clamp(max=nk - 1), scale, out, out, lse, None)
    return out, lse


def structured_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, config, seed: int, stats_type):
    """:func:`hyperattn.reference.structured.run` with the attention steps on the kernels."""
    return ref.structured_run(q, k, v, scale, causal, ref.budget_from_config(config), seed, config.max_error,
                              stats_type, attend=_BlockAttention(), exact=exact_lse)[:3]
