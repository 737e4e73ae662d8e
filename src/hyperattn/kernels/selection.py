"""The selection's one heavy step on CUDA: the probe rows (mirrors :mod:`hyperattn.reference.selection`).

:func:`probe_exact` has the reference's signature and result: the probe rows' exact
output and log-sum-exp through FlexAttention (a block mask of the keys each probe tile
sees), then each chunk's column mass ``sum_r exp(s_rc - lse_r)`` in one Triton kernel
(no (rows x keys) matrix in memory), whose top columns are the chunk's heavy columns.
Every other selection step is the reference's own PyTorch code, run on the GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.selection import Plan, Pooled, finders
from .attention import _precision

__all__ = ["probe_exact", "block_scores", "pool", "probe_rows"]

# Column-mass elements (chunks x keys) held at once per call; bounds memory at 1M keys.
_MASS_ELEMENTS = 1 << 28


@triton.jit
def _column_mass(Q, K, LSE, ROWS, MASS, scale, nq, nk, offset, heads, group, chunks, chunk0, num_chunks,
                 P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 PRECISION: tl.constexpr):
    # One program: one tile of BLOCK_N keys against the P probe rows of every query head of
    # one (batch, KV head, chunk), summed over the heads (heavy columns are per KV head).
    pid_n = tl.program_id(0)
    pid = tl.program_id(1)  # ((b * kv_heads + kvh) * num_chunks + c_local)
    c_local = pid % num_chunks
    bkv = pid // num_chunks
    kv_heads = heads // group
    kvh = bkv % kv_heads
    b = bkv // kv_heads
    c = chunk0 + c_local
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + (bkv * nk + keys)[:, None] * HEAD_DIM + d[None, :], mask=(keys < nk)[:, None], other=0.0)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in range(group):
        bh = b * heads + kvh * group + g
        rows = tl.load(ROWS + (bh * chunks + c) * P + tl.arange(0, P))  # [P], -1: none
        ok_rows = rows >= 0
        last = tl.max(tl.where(ok_rows, rows, -1), axis=0)
        if CAUSAL:
            limit = last + offset
        else:
            limit = tl.where(last >= 0, nk - 1, -1)
        if pid_n * BLOCK_N <= limit:
            rows_c = tl.maximum(rows, 0)
            q = tl.load(Q + (bh * nq + rows_c)[:, None] * HEAD_DIM + d[None, :])  # [P, D]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [P, BLOCK_N]
            lse = tl.load(LSE + (bh * chunks + c) * P + tl.arange(0, P))
            seen = ok_rows[:, None] & (keys[None, :] < nk)
            if CAUSAL:
                seen = seen & (keys[None, :] <= rows[:, None] + offset)
            p = tl.where(seen, tl.exp(s - tl.where(ok_rows, lse, 0.0)[:, None]), 0.0)
            total += tl.sum(p, axis=0)
    tl.store(MASS + (bkv * num_chunks + c_local) * nk + keys, total, mask=keys < nk)


def _flex_rows(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Exact attention of ``rows (B, Hq, R)`` through FlexAttention: ``out (B, Hq, R, D)`` fp32, ``lse``."""
    from torch.nn.attention.flex_attention import BlockMask

    from .structured import _run

    bsz, hq, r = rows.shape
    dim = q.shape[-1]
    nk, offset, causal = plan.nk, plan.offset, plan.causal
    pad = math.ceil(r / 128) * 128 - r
    rows_p = torch.nn.functional.pad(rows, (0, pad), value=-1)
    q_rows = q.gather(2, rows_p.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, dim))
    limit = (rows_p + offset) if causal else torch.where(rows_p >= 0, nk - 1, -1)
    tile_limit = limit.reshape(bsz, hq, -1, 128).amax(-1)
    nkb = plan.nkb
    num = torch.clamp(tile_limit // 128 + 1, 0, nkb).int()
    idx = torch.arange(nkb, device=q.device, dtype=torch.int32).expand(bsz, hq, num.shape[-1], -1).contiguous()

    def seen(b, h, q_idx, kv_idx):
        return (kv_idx <= limit[b, h, q_idx]) & (kv_idx < nk)

    mask = BlockMask.from_kv_blocks(num.contiguous(), idx, BLOCK_SIZE=128, mask_mod=seen,
                                    seq_lengths=(r + pad, nk), compute_q_blocks=False)
    out, lse = _run("probe", q_rows, k, v, scale, mask, gqa=q.shape[1] != k.shape[1])
    return out[:, :, :r].float(), lse[:, :, :r]


def probe_exact(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, rows: Tensor, heavy: int,
                num_sinks: int, probe_blocks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`hyperattn.reference.selection.probe_exact` on CUDA (same contract)."""
    bsz, hq, nc, p = rows.shape
    hkv, nk = k.shape[1], k.shape[2]
    flat = rows.reshape(bsz, hq, nc * p)
    out, lse = _flex_rows(q, k, v, scale, plan, flat)
    count = min(heavy, nk)
    heavy_idx = torch.full((bsz, hkv, nc, count), -1, dtype=torch.long, device=q.device)
    if count and p >= 16 and p & (p - 1) == 0:
        qc, kc = q.contiguous(), k.contiguous()
        # Only the finding probe rows count (reference: finders).
        rows_c = torch.where(finders(p, probe_blocks, q.device), rows, -1).contiguous()
        lse_c = lse.reshape(bsz, hq, nc, p).contiguous()
        step = max(1, _MASS_ELEMENTS // max(1, bsz * hkv * nk))
        block_n = 128
        for c0 in range(0, nc, step):
            c1 = min(nc, c0 + step)
            mass = torch.empty(bsz, hkv, c1 - c0, nk, device=q.device, dtype=torch.float32)
            grid = (triton.cdiv(nk, block_n), bsz * hkv * (c1 - c0))
            _column_mass[grid](qc, kc, lse_c, rows_c, mass, scale, q.shape[2], nk, plan.offset, hq, hq // hkv, nc, c0,
                               c1 - c0, P=p, HEAD_DIM=q.shape[-1], BLOCK_N=block_n, CAUSAL=plan.causal,
                               # fp32 inputs: full-precision products, so heavy columns match the reference's.
                               PRECISION=_precision(q.dtype))
            mass[..., :num_sinks] = 0.0
            values, index = torch.topk(mass, count, dim=-1)
            heavy_idx[:, :, c0:c1] = torch.where(values > 0, index, -1)
    elif count:
        from ..reference.selection import probe_exact as reference

        return reference(q, k, v, scale, plan, rows, heavy, num_sinks, probe_blocks)
    seen = (flat + plan.offset + 1).clamp(0, nk) if plan.causal else torch.where(flat >= 0, nk, 0)
    pairs = seen.sum(dtype=torch.float64) / (bsz * hq)  # a tensor: no host sync
    return out.reshape(bsz, hq, nc, p, -1), lse.reshape(bsz, hq, nc, p), heavy_idx, pairs


@triton.jit
def _block_scores_kernel(QP, VALID, KP, BLOCKS, WLO, WHI, OUT, scale, num_heads, group, kv_heads, c_blocks, nqb, nkb,
                         G: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr,
                         CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    # One selected query block of one head: the softmax of its pooled queries over the
    # candidate key blocks' pooled keys (two passes: max and sum, then weights), summed
    # over the block's pooled rows. No (pooled rows x key blocks) table leaves the chip.
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // group
    j = tl.load(BLOCKS + bh * c_blocks + i).to(tl.int64)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_k = tl.arange(0, BLOCK_K)
    g_ok = offs_g < G
    qp = tl.load(QP + ((bh * nqb + j) * G + offs_g)[:, None] * HEAD_DIM + offs_d[None, :], mask=g_ok[:, None],
                 other=0.0)
    g_w = tl.load(VALID + j * G + offs_g, mask=g_ok, other=0).to(tl.float32)
    wlo = tl.load(WLO + j)
    whi = tl.load(WHI + j)
    k_base = (b * kv_heads + kvh) * nkb
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    for k0 in range(0, nkb, BLOCK_K):
        kb = k0 + offs_k
        kp = tl.load(KP + (k_base + kb)[:, None] * HEAD_DIM + offs_d[None, :], mask=(kb < nkb)[:, None], other=0.0)
        cand = kb < wlo if CAUSAL else (kb < wlo) | ((kb > whi) & (kb < nkb))
        s = tl.dot(qp, tl.trans(kp), input_precision=PRECISION).to(tl.float32) * scale
        s = tl.where(cand[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    w_row = tl.where(l_i > 0, g_w / tl.where(l_i > 0, l_i, 1.0), 0.0)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    out = OUT + (bh * c_blocks + i) * nkb
    for k0 in range(0, nkb, BLOCK_K):
        kb = k0 + offs_k
        kp = tl.load(KP + (k_base + kb)[:, None] * HEAD_DIM + offs_d[None, :], mask=(kb < nkb)[:, None], other=0.0)
        cand = kb < wlo if CAUSAL else (kb < wlo) | ((kb > whi) & (kb < nkb))
        s = tl.dot(qp, tl.trans(kp), input_precision=PRECISION).to(tl.float32) * scale
        p = tl.exp(tl.where(cand[None, :], s, float("-inf")) - m_safe[:, None]) * w_row[:, None]
        tl.store(out + kb, tl.where(cand, tl.sum(p, 0), -1.0), mask=kb < nkb)


def block_scores(pooled: Pooled, scale: float, plan: Plan, blocks: Tensor) -> Tensor:
    """:func:`hyperattn.reference.selection.block_scores` on CUDA in one launch (same contract)."""
    bsz, hq, c = blocks.shape
    hkv, dim = pooled.k.shape[1], pooled.k.shape[-1]
    groups = pooled.q.shape[3]
    out = torch.empty(bsz, hq, c, plan.nkb, device=blocks.device, dtype=torch.float32)
    if c == 0 or dim not in (16, 32, 64, 128, 256) or pooled.q.dtype == torch.float64:
        from ..reference.selection import block_scores as reference

        return reference(pooled, scale, plan, blocks)
    device = blocks.device
    _block_scores_kernel[(c, bsz * hq)](
        pooled.q.contiguous(), pooled.valid.to(torch.int8).contiguous(), pooled.k.contiguous(),
        blocks.int().contiguous(), plan.win_lo.to(device=device, dtype=torch.int32),
        plan.win_hi.to(device=device, dtype=torch.int32), out, scale, hq, hq // hkv, hkv, c, plan.nqb, plan.nkb,
        G=groups, GP=max(16, triton.next_power_of_2(groups)), HEAD_DIM=dim, BLOCK_K=64, CAUSAL=plan.causal,
        # fp32 inputs: full-precision products, so the ranking matches the reference's.
        PRECISION=_precision(pooled.q.dtype), num_warps=4)
    return out


@triton.jit
def _mean_rows_kernel(X, OUT, n, size, num_out, stride_b, stride_h, stride_n, num_heads, HEAD_DIM: tl.constexpr):
    # One mean of `size` consecutive rows, summed one row after another in fp32: the same
    # bits whatever the tensor's shape (a reduction kernel's order depends on it, and a
    # flipped last bit reorders near-tied block scores between, e.g., 1 and 2 GPUs).
    p = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    d = tl.arange(0, HEAD_DIM)
    base = X + b * stride_b + h * stride_h
    total = tl.zeros([HEAD_DIM], dtype=tl.float32)
    start = p * size
    end = tl.minimum(start + size, n)
    for r in range(start, end):
        total += tl.load(base + r * stride_n + d).to(tl.float32)
    count = tl.maximum(end - start, 1)
    tl.store(OUT + (bh * num_out + p) * HEAD_DIM + d, (total / count).to(OUT.dtype.element_ty))


def _means(x: Tensor, size: int, num_out: int) -> Tensor:
    bsz, heads, n, dim = x.shape
    out = torch.empty(bsz, heads, num_out, dim, device=x.device, dtype=x.dtype)
    _mean_rows_kernel[(num_out, bsz * heads)](x, out, n, size, num_out, x.stride(0), x.stride(1), x.stride(2), heads,
                                              HEAD_DIM=dim, num_warps=1)
    return out


def pool(q: Tensor, k: Tensor, plan: Plan, score_group: int) -> Pooled:
    """:func:`hyperattn.reference.selection.pool` on CUDA (same contract; fp32 sums in a fixed order)."""
    dim = q.shape[-1]
    if dim not in (16, 32, 64, 128, 256) or q.stride(-1) != 1 or k.stride(-1) != 1 or q.dtype == torch.float64:
        from ..reference.selection import pool as reference

        return reference(q, k, plan, score_group)
    t, g = plan.block, score_group
    groups = plan.nqb * t // g
    q_pool = _means(q, g, groups)
    k_pool = _means(k, t, plan.nkb)
    rows_ok = torch.clamp(plan.nq - g * torch.arange(groups, device=q.device), 0, g)
    valid = (rows_ok > 0).reshape(plan.nqb, t // g)
    return Pooled(q_pool.reshape(q.shape[0], q.shape[1], plan.nqb, t // g, dim), valid, k_pool)


@triton.jit
def _mix(x):
    # reference.selection._mix: a 32-bit finaliser on int64 holding 32-bit values.
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


@triton.jit
def _probe_rows_kernel(OUT, HEADS, h1, h2, num_heads, chunks, chunk_blocks, first, nqb, nq, block,
                       P: tl.constexpr, R: tl.constexpr, PR: tl.constexpr):
    # One (batch, head, chunk): its P probe blocks and R rows in each, the same counter hash
    # as reference.selection.uniforms (h1, h2: the hash of (seed, stream) for streams 1, 2).
    pid = tl.program_id(0)
    c = (pid % chunks).to(tl.int64)
    bh = pid // chunks
    b = (bh // num_heads).to(tl.int64)
    h = tl.load(HEADS + bh % num_heads).to(tl.int64)
    i = tl.arange(0, PR)
    p = (i // R).to(tl.int64)
    r = (i % R).to(tl.int64)
    lo = tl.maximum(c * chunk_blocks, first)
    hi = tl.minimum((c + 1) * chunk_blocks, nqb)
    span = tl.maximum(hi - lo, 0)
    u1 = _mix(_mix(_mix(_mix(h1 ^ b) ^ h) ^ c) ^ p).to(tl.float64) / 4294967296.0
    blk = lo + ((p.to(tl.float64) + u1) * span.to(tl.float64) / P).to(tl.int64)
    start = blk * block
    u2 = _mix(_mix(_mix(_mix(_mix(h2 ^ b) ^ h) ^ c) ^ p) ^ r).to(tl.float64) / 4294967296.0
    rows = start + (u2 * tl.minimum(nq - start, block).to(tl.float64)).to(tl.int64)
    rows = tl.where(span > 0, rows, -1)
    tl.store(OUT + pid.to(tl.int64) * P * R + i, rows, mask=i < P * R)


def probe_rows(plan: Plan, seed: int, batch: int, heads: Tensor, probe_blocks: int, rows_per_block: int) -> Tensor:
    """:func:`hyperattn.reference.selection.probe_rows` on CUDA in one launch (the same rows)."""
    from ..reference.selection import stream_hash

    hq, nc = heads.shape[0], plan.num_chunks
    out = torch.empty(batch, hq, nc, probe_blocks * rows_per_block, dtype=torch.long, device=heads.device)
    if out.numel():
        _probe_rows_kernel[(batch * hq * nc,)](
            out, heads.contiguous(), stream_hash(seed, 1), stream_hash(seed, 2), hq, nc, plan.chunk_blocks, plan.first,
            plan.nqb, plan.nq, plan.block, P=probe_blocks, R=rows_per_block,
            PR=triton.next_power_of_2(probe_blocks * rows_per_block), num_warps=1)
    return out
