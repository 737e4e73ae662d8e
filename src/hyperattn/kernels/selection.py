"""The selection's heavy steps on CUDA (mirrors :mod:`hyperattn.reference.selection`).

:func:`probe_exact` has the reference's signature and result in two Triton launches: the
probe rows' exact output and log-sum-exp (``_probe_kernel``, a flash forward over the
gathered rows), then each chunk's column mass ``sum_r exp(s_rc - lse_r)`` with the
group's query heads stacked in one product (``_column_mass``; no (rows x keys) matrix in
memory), whose top columns are the chunk's heavy columns. :func:`block_scores`,
:func:`rank_blocks`, :func:`pool` and :func:`probe_rows` are one launch each; the other selection steps are
the reference's own PyTorch code, run on the GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.lsh import draw_projections
from ..reference.selection import (CARRIED, RESCORED, Lsh, Plan, Pooled, carried_columns, carried_scores, finders,
                                   group_rows, heavy_range, probe_pairs, sorted_rows, span_cuts, to_device,
                                   top_candidates)
from .attention import _kv_at, _normalised, _precision, _tile_update
from .sparse import _autotuned

__all__ = ["probe_exact", "block_scores", "rank_blocks", "pool", "probe_rows", "lsh_ranges", "bucket_ranges",
           "gather_columns"]

# Column-mass elements (chunks x keys) held at once per call; bounds memory at 1M keys.
_MASS_ELEMENTS = 1 << 28


@triton.jit
def _last_key(rows, offset, nk, CAUSAL: tl.constexpr):
    # The last key each probe row sees; -1 for rows -1 (chunks with no approximate rows).
    # Integer arithmetic on the rows (seen: 1 for a row, 0 for -1), not a select on a mask:
    # a boolean here trips Triton 3.6's layout pass on sm_90 in _column_mass.
    seen = tl.minimum(rows + 1, 1)
    if CAUSAL:
        limit = rows + offset * seen
    else:
        limit = nk * seen - 1
    return limit


@triton.jit
def _probe_kernel(Q, K, V, ROWS, KLO, KHI, OUT, LSE, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                  stride_kn, stride_vb, stride_vh, stride_vn, kv_heads, group, chunks, probe, nk, offset, split_rows,
                  qk_scale, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, NEED_OUT: tl.constexpr):
    # A tile of one chunk's probe rows, the query heads of one KV head stacked (they read
    # the same keys: one K/V load serves them all), over one of the splits of the keys they
    # see: exact attention, one online softmax (the splits are merged by LSE afterwards;
    # they balance chunks late in a causal sequence against early ones). Key tiles every
    # row sees run unmasked. The chunk's rows score keys [KLO[c], KHI[c]) (heavy_range).
    tile = tl.program_id(0)
    pid = tl.program_id(1).to(tl.int64)  # (b * kv_heads + kvh) * chunks + c
    part = tl.program_id(2)
    bkv = pid // chunks
    b = bkv // kv_heads
    # Slot i of the chunk's stacked rows: probe row i % P of the group's head i // P.
    slot = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    in_group = slot < group * probe
    heads = (bkv % kv_heads) * group + slot // probe  # int64: head x stride passes 2**31 at 1M keys
    place = ((b * kv_heads * group + heads) * chunks + pid % chunks) * probe + slot % probe  # in (B, Hq, C * P)
    rows = tl.load(ROWS + place, mask=in_group, other=-1)  # -1: none
    row_ok = rows >= 0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + tl.maximum(rows, 0)[:, None] * stride_qn
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = b * stride_kb + (bkv % kv_heads) * stride_kh
    v_base = b * stride_vb + (bkv % kv_heads) * stride_vh
    k_lo = tl.load(KLO + pid % chunks)
    # A row's last key within the chunk's range (-1 stays -1: none).
    limit = tl.minimum(_last_key(rows, offset, nk, CAUSAL), tl.load(KHI + pid % chunks) - 1)
    seen = tl.minimum(tl.max(limit, 0) + 1, nk)
    step = tl.cdiv(tl.cdiv(tl.maximum(seen - k_lo, 0), tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = k_lo + part * step
    end = tl.minimum(start + step, seen)
    # Keys every row of the tile sees (none when a row is -1: it sees no key and stays masked).
    low = tl.min(limit, 0)
    qk_scale = qk_scale * 1.4426950408889634
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        k_ok = cols < nk
        if NEED_OUT:
            k, v = _kv_at(K, V, cols, k_ok, k_base, v_base, stride_kn, stride_vn, offs_d)
            if n0 + BLOCK_N - 1 <= low:
                acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, None, qk_scale, False, PRECISION)
            else:
                valid = cols[None, :] <= limit[:, None]
                acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, True, PRECISION)
        else:
            # The log-sum-exp alone (the heavy columns need no output): no V, one product.
            k = tl.load(K + k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(cols[None, :] <= limit[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
    out, lse = _normalised(acc, m_i, l_i)
    dest = part * split_rows + place
    if NEED_OUT:
        tl.store(OUT + dest[:, None] * HEAD_DIM + offs_d[None, :], out, mask=in_group[:, None])
    tl.store(LSE + dest, lse, mask=in_group)


# Key splits of the probe rows' attention: one per this many keys, at most _PROBE_SPLITS.
_PROBE_SPLIT_KEYS = 16384
_PROBE_SPLITS = 8

_PROBE = _autotuned(_probe_kernel, [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                                    for n, w, s in ((64, 8, 3), (128, 8, 3), (64, 4, 3), (32, 4, 2))],
                    ["HEAD_DIM", "CAUSAL", "BLOCK_M", "PRECISION", "NEED_OUT"])


def _exact_rows(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, rows: Tensor, need_out: bool = True,
                span: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor | None, Tensor]:
    """Exact attention of the probe rows ``(B, Hq, C, P)`` (``-1``: none, out 0 and lse -inf): ``out (B, Hq, C * P, D)``
    fp32 (``None`` without ``need_out``), ``lse``; over each chunk's keys ``span = (lo, hi)`` ``(C,)`` if given,
    else every key a row sees."""
    bsz, hq, nc, p = rows.shape
    hkv, nk = k.shape[1], k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    # Key splits per row: from the length alone, never from the heads in the call, so a call
    # on some of the heads rounds as the call on all of them (context parallelism).
    splits = min(_PROBE_SPLITS, max(1, nk // _PROBE_SPLIT_KEYS))
    out = torch.empty(splits, bsz, hq, nc * p, v.shape[-1] if need_out else 0, device=q.device, dtype=torch.float32)
    lse = torch.empty(splits, bsz, hq, nc * p, device=q.device, dtype=torch.float32)
    if lse.numel() == 0:
        return (out[0] if need_out else None), lse[0]
    width = hq // hkv * p  # the rows of a chunk, the KV head's query heads stacked
    block_m = min(max(16, triton.next_power_of_2(width)), 128)
    k_lo, k_hi = span if span is not None else _heavy_range(plan, None, q.device)[:2]
    _PROBE[(triton.cdiv(width, block_m), bsz * hkv * nc, splits)](
        q, k, v, rows.contiguous(), k_lo, k_hi, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
        k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), hkv, hq // hkv, nc, p, nk, plan.offset, bsz * hq * nc * p,
        scale, CAUSAL=plan.causal, HEAD_DIM=q.shape[-1], BLOCK_M=block_m, PRECISION=_precision(q.dtype),
        NEED_OUT=need_out)
    if splits == 1:
        return (out[0] if need_out else None), lse[0]
    # The splits merged by LSE, in a fixed order; rows that saw no key: out 0, lse -inf.
    top = lse.amax(0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w = torch.exp(lse - top)
    total = w.sum(0)
    merged = None
    if need_out:
        merged = (w.unsqueeze(-1) * out).sum(0) / total.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return merged, torch.where(total > 0, top + torch.log(total), float("-inf"))


@triton.jit
def _column_mass(QS, K, LSES, ROWS, KLO, KHI, MASS, stride_kb, stride_kh, stride_kn, scale, nk, offset, kv_heads,
                 chunk_rows, chunks, chunk0, num_chunks, width, num_sinks, M: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, NC_P: tl.constexpr):
    # One tile of BLOCK_N keys of one (batch, KV head) against each chunk's finding probe
    # rows, the group's query heads stacked (QS, LSES, ROWS: (B, Hkv, C, M), gathered once,
    # so each chunk's rows are one contiguous load and the loop has no branch to stall its
    # pipelining), chunk after chunk with the key tile loaded once; the rows' softmax
    # weights summed per key. Causal: the chunks whose rows all end before the tile are
    # skipped (MASS starts at zero), and so are the chunks whose keys [KLO, KHI) miss the
    # tile (both ends ascend with the chunk: a count of each gives the run of chunks).
    # MASS holds each chunk's keys from its KLO on, `width` of them (every key it may weigh).
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // kv_heads
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * stride_kb + (bkv % kv_heads) * stride_kh + keys[:, None] * stride_kn + d[None, :],
                mask=(keys < nk)[:, None], other=0.0)
    slots = tl.arange(0, M)
    c_lo = 0
    if CAUSAL:
        # A row r of chunk c sees keys up to r + offset < (c + 1) * chunk_rows + offset.
        c_lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // chunk_rows - chunk0
        c_lo = tl.maximum(c_lo, 0)
    every = tl.arange(0, NC_P)
    in_call = (every >= chunk0) & (every < chunk0 + num_chunks)
    tile0 = pid_n * BLOCK_N
    c_lo = tl.maximum(c_lo, tl.sum(((tl.load(KHI + every, mask=in_call, other=nk) <= tile0) & in_call).to(tl.int32)))
    c_hi = tl.sum(((tl.load(KLO + every, mask=in_call, other=nk) < tile0 + BLOCK_N) & in_call).to(tl.int32))
    for c_local in range(c_lo, c_hi):
        at = (bkv * chunks + chunk0 + c_local) * M + slots
        rows = tl.load(ROWS + at)  # [M], -1: none
        q = tl.load(QS + at[:, None] * HEAD_DIM + d[None, :])
        lse = tl.load(LSES + at)
        limit = tl.minimum(_last_key(rows, offset, nk, CAUSAL), tl.load(KHI + chunk0 + c_local) - 1)
        # Keys on the product's rows, probe rows on its columns: the sum over probe rows then
        # stays within each warp (over the MMA's rows it crossed warps through shared memory
        # and a barrier, once per chunk).
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION).to(tl.float32) * scale  # [BLOCK_N, M]
        k_lo = tl.load(KLO + chunk0 + c_local)
        seen = (keys[:, None] <= limit[None, :]) & (keys[:, None] < nk) & (keys[:, None] >= k_lo)
        total = tl.sum(tl.where(seen, tl.exp(s - lse[None, :]), 0.0), axis=1)
        total = tl.where(keys >= num_sinks, total, 0.0)  # the sinks are exact already
        at_key = keys - k_lo
        tl.store(MASS + (bkv * num_chunks + c_local) * width + at_key, total,
                 mask=(keys < nk) & (at_key >= 0) & (at_key < width))


# Its launch writes each key's mass once (stores, no adds): timed runs need nothing restored.
# A 128 x 128 fp32 score tile in 4 warps spills (the untuned launch ran at ~200 TFLOP/s of
# its products at 131k, 2.8 ms on an H100).
_MASS = _autotuned(_column_mass, [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                                  for n, w, s in ((128, 8, 3), (64, 8, 3), (64, 4, 3), (128, 4, 3), (32, 4, 2))],
                   ["HEAD_DIM", "M", "CAUSAL", "PRECISION"])


def _heavy_range(plan: Plan, span: int | None, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """:func:`~hyperattn.reference.selection.heavy_range` on ``device`` and the most keys one chunk's finding rows
    may weigh there (a causal row sees none past its own): the width of each chunk's column mass from its ``lo``
    on. Read-only, built once per shape."""
    return _heavy_range_of(plan.nq, plan.nk, plan.causal, plan.block, plan.chunk_blocks, span, device)


@functools.lru_cache(maxsize=64)
def _heavy_range_of(nq: int, nk: int, causal: bool, block: int, chunk_blocks: int, span: int | None,
                    device: torch.device) -> tuple[Tensor, Tensor, int]:
    # The ranges depend on the shape alone; a copy per call would cost host time.
    plan = Plan(nq, nk, causal, block, 0, chunk_blocks, 0, torch.zeros(0), torch.zeros(0))
    lo, hi = heavy_range(plan, span)
    end = hi
    if causal:  # a chunk's last row sees keys up to its own position
        last = torch.clamp((torch.arange(len(lo)) + 1) * chunk_blocks * block, max=nq) + (nk - nq)
        end = torch.minimum(hi, torch.clamp(last, min=0))
    width = max(1, int((end - lo).max())) if len(lo) else 1
    return to_device(lo, device), to_device(hi, device), width


def _span_cuts(plan: Plan, span: int | None) -> bool:
    """:func:`~hyperattn.reference.selection.span_cuts`, kept per shape (no host work per call)."""
    return _span_cuts_of(plan.nq, plan.nk, plan.causal, plan.block, plan.chunk_blocks, span)


@functools.lru_cache(maxsize=64)
def _span_cuts_of(nq: int, nk: int, causal: bool, block: int, chunk_blocks: int, span: int | None) -> bool:
    return span_cuts(Plan(nq, nk, causal, block, 0, chunk_blocks, 0, torch.zeros(0), torch.zeros(0)), span)


@functools.lru_cache(maxsize=16)
def _finding(p: int, probe_blocks: int, device: torch.device) -> tuple[int, Tensor, Tensor]:
    """:func:`~hyperattn.reference.selection.finders` of ``p`` probe rows: their count, slots
    (ascending) and mask, the last two on ``device`` (read-only, kept per shape).

    Built there from their closed form (the even probe blocks), not copied from the host:
    a pinned host buffer per call stalled the queue (10 ms per call at 131k).
    """
    rpb = max(1, p // probe_blocks)
    count = int(finders(p, probe_blocks, "cpu").sum())
    j = torch.arange(count, device=device)
    return count, (j // rpb) * 2 * rpb + j % rpb, finders(p, probe_blocks, device)



@functools.lru_cache(maxsize=16)
def _estimating(p: int, probe_blocks: int, device: torch.device) -> Tensor:
    """The slots (ascending) of the ``p`` probe rows that are not :func:`_finding`'s, on ``device``
    (read-only, copied once per shape)."""
    return torch.nonzero(~finders(p, probe_blocks, "cpu")).flatten().to(device)


def _stacked_finders(q: Tensor, rows: Tensor, lse: Tensor, hkv: int, probe_blocks: int, m: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The finding rows ``(B, Hq, C, P)`` of each chunk, the KV head's query heads stacked and
    padded to ``m``: their queries ``(B, Hkv, C, m, D)``, rows (``-1``: none) and LSE (0 there)."""
    bsz, hq, nc, p = rows.shape
    slots = _finding(p, probe_blocks, rows.device)[1]
    r = rows.index_select(-1, slots)
    pf = r.shape[-1]
    l = torch.where(r >= 0, lse.index_select(-1, slots), 0.0)
    qs = q.gather(2, r.clamp(min=0).reshape(bsz, hq, nc * pf, 1).expand(-1, -1, -1, q.shape[-1]))

    def stack(x, fill):
        x = x.reshape(bsz, hkv, hq // hkv, nc, pf, *x.shape[4:]).transpose(2, 3)
        x = x.reshape(bsz, hkv, nc, (hq // hkv) * pf, *x.shape[5:])
        pad = m - x.shape[3]
        if pad:
            x = torch.cat([x, x.new_full((*x.shape[:3], pad, *x.shape[4:]), fill)], dim=3)
        return x.contiguous()

    return stack(qs.reshape(bsz, hq, nc, pf, -1), 0), stack(r, -1), stack(l, 0.0)


def probe_exact(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, rows: Tensor, heavy: int,
                num_sinks: int, probe_blocks: int, need_out: bool = True, span: int | None = None
                ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """:func:`hyperattn.reference.selection.probe_exact` on CUDA (same contract).

    The finding rows are scored for their LSE alone (no values: the column mass needs only
    that), the estimating rows, with ``need_out``, for their output too: two launches.
    Without ``need_out`` the first alone runs (a quarter of the work of every row's output:
    half the rows, no values; with it, three quarters).
    """
    bsz, hq, nc, p = rows.shape
    hkv, nk = k.shape[1], k.shape[2]
    _, picked, find = _finding(p, probe_blocks, rows.device)
    scored = rows if need_out else torch.where(find, rows, -1)
    h_lo, h_hi, _ = _heavy_range(plan, span, q.device)
    _, lse_f = _exact_rows(q, k, v, scale, plan, rows.index_select(-1, picked), need_out=False, span=(h_lo, h_hi))
    lse = torch.full((bsz, hq, nc, p), float("-inf"), device=q.device)
    lse.index_copy_(-1, picked, lse_f.reshape(bsz, hq, nc, -1))
    out = None
    if need_out:
        rest = _estimating(p, probe_blocks, rows.device)
        if len(rest):
            out_e, lse_e = _exact_rows(q, k, v, scale, plan, rows.index_select(-1, rest))
            lse.index_copy_(-1, rest, lse_e.reshape(bsz, hq, nc, -1))
        out = torch.zeros(bsz, hq, nc, p, v.shape[-1], device=q.device)
        if len(rest):
            out.index_copy_(3, rest, out_e.reshape(bsz, hq, nc, len(rest), -1))
    flat = scored.reshape(bsz, hq, nc * p)
    count = min(heavy, nk)
    heavy_idx = torch.full((bsz, hkv, nc, count), -1, dtype=torch.long, device=q.device)
    carried = None
    if count:
        cuts = _span_cuts(plan, span)
        near, near_mass = _column_top(q, k, rows, lse, plan, span, scale, min(RESCORED * count, nk) if cuts else count,
                                      num_sinks, probe_blocks)
        if not cuts:
            heavy_idx = near
        else:
            # The columns found near each chunk, carried to the later ones (reference: the same
            # steps); the finding rows' LSE then covers them, and the near candidates' mass and
            # theirs are taken under it.
            carried = carried_columns(near[..., :count], near_mass[..., :count], plan, span, CARRIED * count)
            columns = torch.cat([carried, near], dim=-1)
            mass_c = torch.zeros(columns.shape, device=q.device)
            # The finding rows alone (the reference scores every row and masks the others).
            f_rows = rows.index_select(-1, picked)  # (B, Hq, C, Pf)
            pf = f_rows.shape[-1]
            all_find = torch.ones(pf, dtype=torch.bool, device=q.device)
            lse_f = lse.index_select(-1, picked).reshape(bsz, hq, nc * pf)
            m, mc = columns.shape[-1], carried.shape[-1]
            step = max(1, _MASS_ELEMENTS // max(1, bsz * hq * pf * m))
            for c0 in range(0, nc, step):
                c1 = min(nc, c0 + step)
                part = slice(c0 * pf, c1 * pf)
                s_c = carried_scores(q, k, f_rows[:, :, c0:c1].reshape(bsz, hq, -1), columns[:, :, c0:c1], scale,
                                     all_find, plan)
                lse_f[:, :, part] = torch.logaddexp(lse_f[:, :, part], torch.logsumexp(s_c[..., :mc], dim=-1))
                shift = torch.where(torch.isfinite(lse_f[:, :, part]), lse_f[:, :, part], 0.0).unsqueeze(-1)
                mass_c[:, :, c0:c1] = torch.exp(s_c - shift).reshape(bsz, hkv, hq // hkv, c1 - c0, pf, m).sum((2, 4))
            lse = lse.clone()
            lse.index_copy_(-1, picked, lse_f.reshape(bsz, hq, nc, pf))
            heavy_idx = top_candidates(mass_c, columns, count)
    if not need_out:
        return out, lse, heavy_idx, None
    lo = torch.where(find, h_lo.unsqueeze(-1), 0).reshape(-1)
    hi = torch.where(find, h_hi.unsqueeze(-1), plan.nk).reshape(-1)
    return out, lse, heavy_idx, probe_pairs(plan, flat, lo, hi, carried, find)


def _column_top(q: Tensor, k: Tensor, rows: Tensor, lse: Tensor, plan: Plan, span: int | None, scale: float,
                count: int, num_sinks: int, probe_blocks: int) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.selection._top_mass` on CUDA, ``with_mass``: the finding rows' column mass over
    each chunk's keys (``_column_mass``, one launch per piece of chunks), its top ``count`` and their mass."""
    bsz, hq, nc, p = rows.shape
    hkv, nk = k.shape[1], k.shape[2]
    heavy_idx = torch.full((bsz, hkv, nc, count), -1, dtype=torch.long, device=q.device)
    heavy_mass = torch.zeros((bsz, hkv, nc, count), device=q.device)
    # Only the finding probe rows count (reference: finders), the group's heads stacked.
    m = max(16, triton.next_power_of_2((hq // hkv) * _finding(p, probe_blocks, rows.device)[0]))
    qs, rows_s, lse_s = _stacked_finders(q, rows, lse, hkv, probe_blocks, m)
    ks = k if k.stride(-1) == 1 else k.contiguous()
    # Each chunk's mass over its own keys alone, [lo, lo + width): O(N (span + chunk)) memory
    # and top-k work with a heavy_span instead of O(N^2 / chunk).
    h_lo, h_hi, width = _heavy_range(plan, span, q.device)
    step = max(1, _MASS_ELEMENTS // max(1, bsz * hkv * width))
    for c0 in range(0, nc, step):
        c1 = min(nc, c0 + step)
        mass = torch.zeros(bsz, hkv, c1 - c0, width, device=q.device, dtype=torch.float32)
        _MASS[lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]), bsz * hkv)](
            qs, ks, lse_s, rows_s, h_lo, h_hi, mass, ks.stride(0), ks.stride(1), ks.stride(2), scale, nk,
            plan.offset, hkv, plan.chunk_blocks * plan.block, nc, c0, c1 - c0, width, num_sinks, M=m,
            HEAD_DIM=q.shape[-1], CAUSAL=plan.causal,
            # fp32 inputs: full-precision products, so heavy columns match the reference's.
            PRECISION=_precision(q.dtype), NC_P=triton.next_power_of_2(nc))
        values, pick = torch.topk(mass, min(count, width), dim=-1)
        keys = pick + h_lo[c0:c1, None]
        heavy_idx[:, :, c0:c1, :values.shape[-1]] = torch.where(values > 0, keys, -1)
        heavy_mass[:, :, c0:c1, :values.shape[-1]] = torch.clamp(values, min=0.0)
    return heavy_idx, heavy_mass


@triton.jit
def _candidates(kb, wlo, whi, nkb, CAUSAL: tl.constexpr):
    # [rows, key blocks]: the key blocks kb each row's query block may score (Plan.candidates
    # of a block from plan.first): before its window, and after it too when not causal.
    before = kb[None, :] < wlo[:, None]
    if CAUSAL:
        return before
    return before | ((kb[None, :] > whi[:, None]) & (kb[None, :] < nkb))


@triton.jit
def _block_scores_kernel(QP, VALID, KP, BLOCKS, WLO, WHI, OUT, scale, num_heads, group, kv_heads, c_blocks, nqb, nkb,
                         G: tl.constexpr, GP: tl.constexpr, HP: tl.constexpr, QB: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr,
                         PRECISION: tl.constexpr):
    # QB selected query blocks of every query head of one KV head, their pooled rows
    # stacked (one load of a pooled-key tile serves them all): the softmax of each pooled
    # query over the candidate key blocks' pooled keys (two passes: max and sum, then
    # weights), summed over each block's pooled rows. No (pooled rows x key blocks) table
    # leaves the chip. Row slot: ((query block * HP) + head) * GP + pooled row.
    pid = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    M: tl.constexpr = QB * HP * GP
    slot = tl.arange(0, M)
    i = pid * QB + slot // (HP * GP)
    head_l = (slot // GP) % HP
    g = slot % GP
    ok = (i < c_blocks) & (head_l < group) & (g < G)
    bh = b * num_heads + kvh * group + head_l
    j = tl.load(BLOCKS + bh * c_blocks + i, mask=ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_k = tl.arange(0, BLOCK_K)
    qp = tl.load(QP + ((bh * nqb + j) * G + g)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    g_w = tl.load(VALID + j * G + g, mask=ok, other=0).to(tl.float32)
    wlo = tl.load(WLO + j, mask=ok, other=0).to(tl.int32)  # the plan's int64 tables
    whi = tl.load(WHI + j, mask=ok, other=0).to(tl.int32)
    k_base = (b * kv_heads + kvh) * nkb
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    for k0 in range(0, nkb, BLOCK_K):
        kb = k0 + offs_k
        kp = tl.load(KP + (k_base + kb)[:, None] * HEAD_DIM + offs_d[None, :], mask=(kb < nkb)[:, None], other=0.0)
        cand = _candidates(kb, wlo, whi, nkb, CAUSAL)
        s = tl.dot(qp, tl.trans(kp), input_precision=PRECISION).to(tl.float32) * scale
        s = tl.where(cand, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    w_row = tl.where(l_i > 0, g_w / tl.where(l_i > 0, l_i, 1.0), 0.0)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    # One output row per (query block, head), its pooled rows summed.
    R: tl.constexpr = QB * HP
    r = tl.arange(0, R)
    i_r = pid * QB + r // HP
    head_r = r % HP
    ok_r = (i_r < c_blocks) & (head_r < group)
    bh_r = b * num_heads + kvh * group + head_r
    j_r = tl.load(BLOCKS + bh_r * c_blocks + i_r, mask=ok_r, other=0)
    wlo_r = tl.load(WLO + j_r, mask=ok_r, other=0).to(tl.int32)
    whi_r = tl.load(WHI + j_r, mask=ok_r, other=0).to(tl.int32)
    out = OUT + (bh_r * c_blocks + i_r) * nkb
    for k0 in range(0, nkb, BLOCK_K):
        kb = k0 + offs_k
        kp = tl.load(KP + (k_base + kb)[:, None] * HEAD_DIM + offs_d[None, :], mask=(kb < nkb)[:, None], other=0.0)
        cand = _candidates(kb, wlo, whi, nkb, CAUSAL)
        cand_r = _candidates(kb, wlo_r, whi_r, nkb, CAUSAL)
        s = tl.dot(qp, tl.trans(kp), input_precision=PRECISION).to(tl.float32) * scale
        p = tl.exp(tl.where(cand, s, float("-inf")) - m_safe[:, None]) * w_row[:, None]
        score = tl.sum(tl.reshape(p, [R, GP, BLOCK_K]), 1)
        tl.store(out[:, None] + kb[None, :], tl.where(cand_r, score, -1.0), mask=ok_r[:, None] & (kb < nkb)[None, :])


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
    gp, hp = triton.next_power_of_2(groups), triton.next_power_of_2(hq // hkv)
    # Query blocks per program: up to 64 stacked pooled rows (at least 16, a dot's least).
    qb = max(1, 64 // (gp * hp))
    _block_scores_kernel[(triton.cdiv(c, qb), bsz * hkv)](
        pooled.q.contiguous(), pooled.valid.to(torch.int8).contiguous(), pooled.k.contiguous(),
        blocks.int().contiguous(), plan.win_lo.to(device), plan.win_hi.to(device), out, scale, hq, hq // hkv, hkv, c,
        plan.nqb, plan.nkb,
        G=groups, GP=gp, HP=hp, QB=qb, HEAD_DIM=dim, BLOCK_K=64, CAUSAL=plan.causal,
        # fp32 inputs: full-precision products, so the ranking matches the reference's.
        PRECISION=_precision(pooled.q.dtype), num_warps=4)
    return out


@triton.jit
def _rank_kernel(SCORES, OUT, rows, nkb, COUNT: tl.constexpr, ROWS: tl.constexpr, NKB_P: tl.constexpr):
    # ROWS rows of block scores: their COUNT largest, best first (ties to the lower key
    # block), as reference.selection.rank_blocks; -1 where the value is a non-candidate's.
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    kb = tl.arange(0, NKB_P)
    ok = (r < rows)[:, None] & (kb < nkb)[None, :]
    x = tl.load(SCORES + r[:, None] * nkb + kb[None, :], mask=ok, other=float("-inf"))
    for i in tl.static_range(COUNT):
        best = tl.max(x, 1)
        pick = tl.min(tl.where(x == best[:, None], kb[None, :], NKB_P), 1)
        tl.store(OUT + r * COUNT + i, tl.where(best > -0.5, pick, -1).to(tl.int64), mask=r < rows)
        x = tl.where(kb[None, :] == pick[:, None], float("-inf"), x)


def rank_blocks(scores: Tensor, count: int) -> Tensor:
    """:func:`hyperattn.reference.selection.rank_blocks` on CUDA in one launch (ties to the lower key block)."""
    nkb = scores.shape[-1]
    count = min(count, nkb)
    out = torch.empty(*scores.shape[:-1], count, dtype=torch.long, device=scores.device)
    rows = out.numel() // max(count, 1)
    if count == 0 or rows == 0 or count > 64:
        from ..reference.selection import rank_blocks as reference

        return reference(scores, count)
    nkb_p = triton.next_power_of_2(nkb)
    per = max(1, min(4, 4096 // nkb_p))  # rows per program: at most 4096 scores held at once
    _rank_kernel[(triton.cdiv(rows, per),)](scores.contiguous(), out, rows, nkb, COUNT=count, ROWS=per,
                                          NKB_P=nkb_p, num_warps=4)
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
    return Pooled(q_pool.reshape(q.shape[0], q.shape[1], plan.nqb, t // g, dim), _pooled_valid(plan.nq, t, g, q.device),
                  k_pool)


@functools.lru_cache(maxsize=16)
def _pooled_valid(nq: int, block: int, group: int, device: torch.device) -> Tensor:
    # Which pooled query groups hold rows, (nqb, block / group): shapes only, built once per
    # shape (read-only; six launches per call otherwise).
    return (group_rows(nq, block, group, device) > 0).reshape(-1, block // group)


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


def lsh_ranges(q: Tensor, k: Tensor, plan: Plan, lsh_block: int, num_projs: int, seed: int) -> Lsh:
    """:func:`hyperattn.reference.selection.lsh_ranges` on CUDA: the hashing in one launch per tensor."""
    from .lsh import lsh_buckets

    proj = _projections(q.shape[-1], num_projs, seed, q.device)
    return bucket_ranges(lsh_buckets(q, proj), lsh_buckets(k, proj), plan, lsh_block)


@functools.lru_cache(maxsize=16)
def _projections(dim: int, num_projs: int, seed: int, device: torch.device) -> Tensor:
    # Drawn on the host like the reference's and copied without a host wait, once per seed:
    # a fixed seed's layers and calls reuse them (a pinned copy per call costs host time).
    return to_device(draw_projections(dim, num_projs, torch.Generator().manual_seed(seed)), device)


@triton.jit
def _search(A, base, values, ok, n, STEPS: tl.constexpr, RIGHT: tl.constexpr):
    # torch.searchsorted(a, values, right=RIGHT) on the sorted row a = A[base:base + n]: the
    # first index whose entry is greater than (RIGHT) or not less than (left) the value, a
    # binary search per lane.
    lo = tl.zeros(values.shape, dtype=tl.int64)
    hi = tl.zeros(values.shape, dtype=tl.int64) + n
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        entry = tl.load(A + base + mid, mask=active & ok, other=0)
        if RIGHT:
            right = entry <= values
        else:
            right = entry < values
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _gather_kernel(CDF, PI, CSUM, SIZES, SAMPLES, CAND_KEYS, HEAVY, KV_HEADS, IDX, LOGW, h3, num_chunks, kv_heads,
                   nkb, block, num_sinks, num_heavy, m_max, width, fixed, ns,
                   STEPS: tl.constexpr, M_P: tl.constexpr, F_P: tl.constexpr):
    # One (batch, KV head, chunk): its m_max residual draws (reference.selection.gather_columns,
    # the same operations in the same float64 order): stratified uniforms on the proposal's
    # CDF, a key uniformly in the drawn block, its log-weight; every candidate once where
    # the samples cover them; draws equal to a sink or heavy column dropped. First the
    # fixed columns before them: the ns sinks (weight 1), then the heavy columns (-1: none).
    pid = tl.program_id(0).to(tl.int64)  # (b * kv_heads + g) * num_chunks + c
    f = tl.arange(0, F_P)
    f_ok = f < fixed
    col = tl.load(HEAVY + pid * num_heavy + f - ns, mask=f_ok & (f >= ns), other=-1)
    sink = f < ns
    tl.store(IDX + pid * width + f, tl.where(sink, f, tl.maximum(col, 0)).to(tl.int64), mask=f_ok)
    tl.store(LOGW + pid * width + f, tl.where(sink | (col >= 0), 0.0, float("-inf")), mask=f_ok)
    c = pid % num_chunks
    bkv = pid // num_chunks
    b = bkv // kv_heads
    kvh = tl.load(KV_HEADS + bkv % kv_heads).to(tl.int64)
    m = tl.load(SAMPLES + pid).to(tl.int64)
    cand_keys = tl.load(CAND_KEYS + c).to(tl.int64)
    r = tl.arange(0, M_P).to(tl.int64)
    r_ok = r < m_max
    # reference.selection.uniforms(seed, 3, b, kv head, c, r)
    x = _mix(_mix(_mix(_mix(h3 ^ b) ^ kvh) ^ c) ^ r)
    u01 = x.to(tl.float64) / 4294967296.0
    row = pid * nkb
    last = tl.load(CDF + row + nkb - 1)
    u = (r.to(tl.float64) + u01) / tl.maximum(m, 1).to(tl.float64) * last
    s_blk = tl.minimum(_search(CDF, row, u, r_ok, nkb, STEPS, True), nkb - 1)
    p_blk = tl.load(PI + row + s_blk, mask=r_ok, other=1.0)
    prev = tl.load(CDF + row + s_blk, mask=r_ok, other=0.0) - p_blk
    size = tl.load(SIZES + s_blk, mask=r_ok, other=1)
    p_safe = tl.maximum(p_blk, tl.full(p_blk.shape, 1e-300, tl.float64))  # a float64 constant: 1e-300 is 0 in fp32
    offset = ((u - prev) / p_safe * size.to(tl.float64)).to(tl.int64)
    offset = tl.maximum(tl.minimum(offset, size - 1), 0)
    s_logw = (tl.log(size.to(tl.float64)) - tl.log(tl.maximum(m, 1).to(tl.float64)) - tl.log(p_safe)).to(tl.float32)
    # Every candidate once (weight 1) where the samples cover them: the r-th candidate key.
    e_blk = tl.minimum(_search(CSUM, c * nkb, r, r_ok, nkb, STEPS, True), nkb - 1)
    e_end = tl.load(CSUM + c * nkb + e_blk, mask=r_ok, other=0)
    e_key = e_blk * block + r - (e_end - tl.load(SIZES + e_blk, mask=r_ok, other=0))
    full = m >= cand_keys
    key = tl.where(full, e_key, s_blk * block + offset)
    logw = tl.where(full, 0.0, s_logw)
    ok = (r < tl.minimum(m, cand_keys)) & (cand_keys > 0) & (key >= num_sinks)
    for j in range(num_heavy):
        col = tl.load(HEAVY + pid * num_heavy + j)
        ok = ok & ~((key == col) & (col >= 0))
    out = pid * width + fixed + r
    tl.store(IDX + out, tl.where(ok, key, 0), mask=r_ok)
    tl.store(LOGW + out, tl.where(ok, logw, float("-inf")), mask=r_ok)


# proposal_tables per plan shape and device: the plan's part of the proposal is ~20
# launches per call that never change between calls or layers.
_TABLES: dict[tuple, tuple] = {}


def _proposal_tables(plan: Plan, device: torch.device) -> tuple:
    from ..reference.selection import proposal_tables

    key = (plan.nq, plan.nk, plan.causal, plan.block, plan.window, plan.chunk_blocks, plan.first, str(device))
    if key not in _TABLES:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        _TABLES[key] = proposal_tables(plan, device)
    return _TABLES[key]


def gather_columns(plan: Plan, chunk_scores: Tensor, heavy: Tensor, samples: Tensor, m_max: int, num_sinks: int,
                   sample_mix: float, seed: int, kv_heads: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.selection.gather_columns` on CUDA (the same columns and weights).

    The proposal and its CDF are the reference's own (:func:`~hyperattn.reference.selection.residual_proposal`);
    the draws, their keys and log-weights are one launch.
    """
    from ..reference.selection import residual_proposal, stream_hash

    device = chunk_scores.device
    bsz, hkv, nc, nkb = chunk_scores.shape
    tables = _proposal_tables(plan, device)
    sizes, csum, cand_keys, pi, cdf = (x.contiguous() for x in residual_proposal(plan, chunk_scores, sample_mix,
                                                                                 tables))
    ns = min(num_sinks, plan.nk)
    count = heavy.shape[-1]
    fixed = ns + count
    width = fixed + m_max
    idx = torch.empty(bsz, hkv, nc, width, dtype=torch.long, device=device)
    logw = torch.empty(bsz, hkv, nc, width, dtype=torch.float32, device=device)
    if idx.numel():  # one launch writes the sinks, the heavy columns and the draws (host time at 32k)
        _gather_kernel[(bsz * hkv * nc,)](
            cdf, pi, csum, sizes, samples.long().contiguous(), cand_keys, heavy.contiguous(),
            kv_heads.contiguous(), idx, logw, stream_hash(seed, 3), nc, hkv, nkb, plan.block, num_sinks, count, m_max,
            width, fixed, ns, STEPS=max(1, nkb.bit_length()), M_P=triton.next_power_of_2(max(m_max, 1)),
            F_P=triton.next_power_of_2(max(fixed, 1)), num_warps=4)
    return idx, logw


@triton.jit
def _ranges_kernel(COMPOSITE, QB, WIN_LO, LO, HI, num_heads, group, nq, nk, block, first, lsh_block,
                   CAUSAL: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    # Each row's LSH range of sorted key slots (reference.selection.bucket_ranges, before the
    # cut): its bucket's slots [start, end) and the slot e of its anchor position in it.
    bh = tl.program_id(1).to(tl.int64)
    bkv = (bh // num_heads) * (num_heads // group) + (bh % num_heads) // group
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < nq
    qb = tl.load(QB + bh * nq + rows, mask=ok, other=0)
    j = (rows // block).to(tl.int64)
    if CAUSAL:
        anchor = tl.load(WIN_LO + j, mask=ok, other=0).to(tl.int64) * block
    else:
        anchor = tl.minimum(j * block * nk // tl.maximum(nq, 1), nk - 1)
    base = bkv * nk
    start = _search(COMPOSITE, base, qb * nk, ok, nk, STEPS, False)
    end = _search(COMPOSITE, base, (qb + 1) * nk, ok, nk, STEPS, False)
    e = _search(COMPOSITE, base, qb * nk + anchor, ok, nk, STEPS, False)
    if CAUSAL:
        lo = tl.maximum(e - lsh_block, start)
        hi = e
    else:
        lo = tl.maximum(tl.minimum(e - lsh_block // 2, end - lsh_block), start)
        hi = tl.minimum(lo + lsh_block, end)
    active = (j >= first) & (lsh_block > 0)
    tl.store(LO + bh * nq + rows, tl.where(active, lo, 0), mask=ok)
    tl.store(HI + bh * nq + rows, tl.where(active, hi, 0), mask=ok)


@triton.jit
def _cut_kernel(Q_ORDER, LO, HI, n_rows, lsh_tiles, BLOCK: tl.constexpr):
    # Each sorted block's ranges cut to the lsh_tiles key tiles ending at its furthest slot
    # (what the attention kernel's LSH pass reads); a row is in one sorted block: in place.
    # Program (i, b * Hkv + kv head): sorted block i of the KV head's n_rows = G * Nq rows.
    bkv = tl.program_id(1).to(tl.int64)
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = slots < n_rows
    rows = bkv * n_rows + tl.load(Q_ORDER + bkv * n_rows + slots, mask=ok, other=0)
    lo = tl.load(LO + rows, mask=ok, other=0)
    hi = tl.load(HI + rows, mask=ok, other=0)
    hi_max = tl.max(tl.where(ok & (lo < hi), hi, 0), 0)
    floor = tl.maximum((hi_max + BLOCK - 1) // BLOCK - lsh_tiles, 0) * BLOCK
    lo = tl.maximum(lo, floor)
    tl.store(LO + rows, lo, mask=ok)
    tl.store(HI + rows, tl.maximum(hi, lo), mask=ok)


def bucket_ranges(q_bucket: Tensor, k_bucket: Tensor, plan: Plan, lsh_block: int) -> Lsh:
    """:func:`hyperattn.reference.selection.bucket_ranges` on CUDA: the two sorts in PyTorch, the rest in two
    launches (the same ranges)."""
    from ..reference.selection import LSH_TILES  # read per call: the tests vary it

    bsz, hq, nq = q_bucket.shape
    hkv, nk = k_bucket.shape[1], k_bucket.shape[2]
    device = q_bucket.device
    pos = torch.arange(nk, device=device)
    composite, order = torch.sort(k_bucket * nk + pos, dim=-1)
    slot = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))
    q_order = sorted_rows(q_bucket, hkv)
    lo = torch.empty(bsz, hq, nq, dtype=torch.long, device=device)
    hi = torch.empty_like(lo)
    if lo.numel():
        block = 128
        _ranges_kernel[(triton.cdiv(nq, block), bsz * hq)](
            composite.contiguous(), q_bucket.contiguous(), plan.win_lo.to(device), lo, hi, hq, hq // hkv, nq, nk,
            plan.block, plan.first, lsh_block, CAUSAL=plan.causal, STEPS=max(1, nk.bit_length()), BLOCK=block)
        # The cut runs over each KV head's rows together (lo, hi viewed as (B, Hkv, G Nq)).
        _cut_kernel[(triton.cdiv(q_order.shape[-1], plan.block), bsz * hkv)](
            q_order.contiguous(), lo, hi, q_order.shape[-1], LSH_TILES, BLOCK=plan.block)
    return Lsh(order, slot, lo, hi, q_order)
