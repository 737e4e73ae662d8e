"""What each query block of the structured method scores: the selection, written for reading.

The structured method (:mod:`hyperattn.reference.structured`) works on blocks of ``T``
consecutive query rows and ``T`` consecutive keys (``T = query_block``, 128 by default).
For query block ``j`` of head ``(b, h)`` (shape legend of :mod:`hyperattn.ops`):

- **Exact blocks** ``E_j``: the *window*, every key block that holds a key within
  ``window`` keys before the block's first row, up to its last row (the diagonal), and the
  ``k_j`` *top blocks* among the *candidates* (key blocks wholly before the window, or
  outside it when not causal), ranked by pooled block scores (:func:`block_scores`).
- **Gathered columns**: one list per (KV head, chunk of ``chunk`` rows), shared by the KV
  head's query heads (:func:`gather_columns`): the ``num_sinks`` first keys and the chunk's
  ``heavy_columns`` heavy columns (:func:`probe_exact`) with weight 1, and ``m_c``
  *residual samples* of the chunk's candidate keys, drawn by stratified sampling of a
  proposal that mixes uniform (``sample_mix``) with the chunk's block scores, each with
  log-weight ``log(1 / (m_c pi(c)))`` (Hansen-Hurwitz: unbiased). Block ``j`` uses the
  columns that lie in its complement ``C_j`` (its candidates not in ``E_j``). A sample that
  is a sink or heavy column is dropped (already exact). With ``m_c`` at least the chunk's
  candidate keys every candidate is taken once with weight 1, which makes the result exact.
- **LSH block** ``L_r`` of row ``r``: keys are sorted by (Gray-code bucket, position); the
  row takes the bucket-sorted slots ``[lsh_lo[r], lsh_hi[r])``, the ``lsh_block`` most
  recent keys of its own bucket before the window (causal; centred on the block when not
  causal), minus keys in ``E_j``. It finds a key wanted by one row alone, which no block
  score sees. A gathered column inside ``L_r`` is masked for that row (counted once).

Everything is decided per block from the block's own rows and keys it sees, and per
*chunk* of ``chunk`` rows (4096) for the heavy columns, probe rows and the guard's tier,
so rows before a multiple of ``chunk`` never depend on later tokens (chunk-causality;
:func:`lsh_ranges` documents its one bounded exception). Randomness is a counter-based
hash of ``(seed, stream, batch, global head, ...)`` (:func:`uniforms`): the same on every
device, and independent of which other heads run in the call.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .lsh import draw_projections, lsh_buckets

__all__ = ["Plan", "Pooled", "Lsh", "Selection", "TIERS", "LSH_TILES", "stream_hash", "uniforms", "first_block", "make_plan",
           "to_device", "pool", "block_scores", "rank_blocks", "chunk_scores", "probe_rows", "probe_exact", "finders",
           "estimating_rows", "lsh_ranges", "bucket_ranges", "sorted_rows", "sorted_spans", "exact_blocks",
           "chunk_candidates", "proposal_tables", "residual_proposal",
           "probe_pairs", "gather_columns", "heavy_range", "span_cuts", "carried_columns", "carried_scores",
           "top_candidates"]

#: Budget tiers of the guard: factors on ``key_blocks`` and ``sample_size``.
TIERS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

#: Carried candidates per heavy column (carried_columns): room for a chunk to keep the lines
#: its earlier chunks found beside the ones near it.
CARRIED = 2

#: Near candidates per heavy column (probe_exact, where the span cuts): the columns with the most
#: mass over the chunk's own keys that are scored again once the carried columns join the
#: finding rows' softmax, instead of a second scan of every key (a second column-mass launch
#: and top-k over the span, ~1.5 ms at 131k on an H100).
RESCORED = 4

# Sorted key tiles one bucket-sorted query block may span in the LSH pass (see lsh_ranges).
LSH_TILES = 16

# Elements of one (rows x key blocks) table built at once; bounds selection memory.
_PIECE = 1 << 26

_MASK32 = 0xFFFFFFFF


def _mix(x: Tensor) -> Tensor:
    # A 32-bit integer finaliser (two multiply-xorshift rounds) on int64 holding 32-bit
    # values: constants < 2**27 keep every product below 2**63, so no overflow.
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def _mix_int(x: int) -> int:
    # _mix on a Python int (the same bits).
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def stream_hash(seed: int, stream: int) -> int:
    """The hash of ``(seed, stream)`` that :func:`uniforms` continues with each index."""
    h = _mix_int(_mix_int((seed >> 32) & _MASK32) ^ _mix_int(stream))
    return _mix_int(h ^ (seed & _MASK32))


def uniforms(seed: int, stream: int, *index: Tensor) -> Tensor:
    """Uniforms in [0, 1) (float64), a hash of ``seed``, ``stream`` and the broadcast integer ``index`` tensors."""
    # The scalar part is hashed on the host: a tensor built from a Python value on a GPU is
    # a copy from pageable memory, which waits for all queued work.
    h = stream_hash(seed, stream)
    for i in index:
        h = _mix(h ^ (i.long() & _MASK32))
    return h.double() / 2.0 ** 32


@dataclass(frozen=True)
class Plan:
    """Geometry of one call: blocks, windows, candidates, chunks (everything shape-only).

    ``win_lo, win_hi: (nqb,)`` first and last key block of each query block's window (on
    the call's device), ``win_width`` the most key blocks of one window, ``win_blocks
    (nqb, win_width)`` each window's blocks in ascending order (``-1``: padding; all ``-1``
    for the exact query blocks before ``first``);
    ``first``: the first approximate query block (earlier rows see at most
    ``min_seq_len`` keys and are exact); ``chunk_blocks`` query blocks per chunk.
    """

    nq: int
    nk: int
    causal: bool
    block: int
    window: int
    chunk_blocks: int
    first: int
    win_lo: Tensor
    win_hi: Tensor
    win_width: int = 0
    win_blocks: Tensor | None = None

    @property
    def offset(self) -> int:
        return self.nk - self.nq if self.causal else 0

    @property
    def nqb(self) -> int:
        return math.ceil(self.nq / self.block)

    @property
    def nkb(self) -> int:
        return math.ceil(self.nk / self.block)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.nqb / self.chunk_blocks)

    def candidates(self, blocks: Tensor) -> Tensor:
        """``(..., nkb)`` bool: key blocks the query blocks ``blocks (...)`` may pick as top blocks or sample from."""
        kb = torch.arange(self.nkb, device=blocks.device)
        lo, hi = self.win_lo.to(blocks.device)[blocks], self.win_hi.to(blocks.device)[blocks]
        outside = (kb < lo.unsqueeze(-1)) if self.causal else ((kb < lo.unsqueeze(-1)) | (kb > hi.unsqueeze(-1)))
        return outside & (blocks >= self.first).unsqueeze(-1)

    def block_sizes(self, device) -> Tensor:
        """Keys in each key block, ``(nkb,)``."""
        return torch.clamp(self.nk - self.block * torch.arange(self.nkb, device=device), max=self.block)


def to_device(x: Tensor, device) -> Tensor:
    """A small host tensor on ``device`` without waiting for queued GPU work (pinned, asynchronous copy)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def first_block(nq: int, nk: int, causal: bool, block: int, min_seq_len: int) -> int:
    """The first approximate query block: rows that see at most ``min_seq_len`` keys are exact."""
    nqb = math.ceil(nq / block)
    if causal:
        return min(nqb, max(0, math.ceil((min_seq_len - (nk - nq)) / block)))
    return 0 if nk > min_seq_len else nqb


# Plans are immutable and depend on shapes only: a model calls with the same few shapes
# layer after layer, so each is built once (its window tables copied to the device once).
@functools.lru_cache(maxsize=64)
def make_plan(nq: int, nk: int, causal: bool, block: int, window: int, chunk: int, min_seq_len: int,
              device=None) -> Plan:
    """The :class:`Plan` of a call: ``block`` rows/keys per block, ``chunk`` rows per chunk (a multiple of ``block``).

    ``device``: where the window tables live (default CPU).
    """
    nqb = math.ceil(nq / block)
    j = torch.arange(nqb)
    if causal:
        offset = nk - nq
        first_key = j * block + offset  # last key the block's first row sees
        last_key = torch.clamp((j + 1) * block, max=nq) - 1 + offset
        win_lo = torch.clamp(first_key - window, min=0) // block
        win_hi = torch.clamp(last_key, min=0) // block
    else:
        centre = torch.clamp(j * block * nk // max(nq, 1), max=nk - 1)
        win_lo = torch.clamp(centre - window, min=0) // block
        win_hi = torch.clamp(centre + block - 1 + window, max=nk - 1) // block
    first = first_block(nq, nk, causal, block, min_seq_len)
    width = int((win_hi - win_lo).max()) + 1 if nqb else 1
    # Each block's window as exact_blocks lists it, built here once per shape (a dozen
    # launches per call otherwise).
    win_blocks = win_lo.unsqueeze(-1) + torch.arange(width)
    win_blocks = torch.where((win_blocks <= win_hi.unsqueeze(-1)) & (j >= first).unsqueeze(-1), win_blocks, -1)
    return Plan(nq, nk, causal, block, window, chunk // block, first, to_device(win_lo, device),
                to_device(win_hi, device), width, to_device(win_blocks, device))


def _pieces(total: int, per_item: int):
    step = max(1, _PIECE // max(1, per_item))
    for start in range(0, total, step):
        yield start, min(total, start + step)


@dataclass(frozen=True)
class Pooled:
    """Mean queries of every ``score_group`` rows ``(B, Hq, nqb, T / g, D)`` (``valid (nqb, T / g)``: groups with rows)
    and mean keys of every key block ``(B, Hkv, nkb, D)``."""

    q: Tensor
    valid: Tensor
    k: Tensor


def group_rows(nq: int, block: int, group: int, device) -> Tensor:
    """Rows in each pooled group of ``group`` query rows, ``(ceil(nq / block) * block / group,)``."""
    return torch.clamp(nq - group * torch.arange(math.ceil(nq / block) * block // group, device=device), 0, group)


def pool(q: Tensor, k: Tensor, plan: Plan, score_group: int) -> Pooled:
    """The :class:`Pooled` queries and keys of a call."""
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    t, g = plan.block, score_group
    q_pad = torch.nn.functional.pad(q, (0, 0, 0, plan.nqb * t - nq))
    rows_ok = group_rows(nq, t, g, q.device)
    q_pool = q_pad.reshape(bsz, hq, plan.nqb * t // g, g, dim).sum(3) / rows_ok.clamp(min=1).unsqueeze(-1).to(q.dtype)
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, plan.nkb * t - nk))
    k_pool = k_pad.reshape(bsz, hkv, plan.nkb, t, dim).sum(3) / plan.block_sizes(k.device).unsqueeze(-1).to(k.dtype)
    return Pooled(q_pool.reshape(bsz, hq, plan.nqb, t // g, dim), (rows_ok > 0).reshape(plan.nqb, t // g), k_pool)


def _per_head(x: Tensor, blocks: Tensor) -> Tensor:
    """``x[..., blocks]`` for a shape-only table ``x (nqb, ...)`` and ``blocks (B, Hq, c)``."""
    return x.to(blocks.device)[blocks]


def block_scores(pooled: Pooled, scale: float, plan: Plan, blocks: Tensor) -> Tensor:
    """Pooled block scores of query blocks ``blocks (B, Hq, c)``: ``(B, Hq, c, nkb)`` fp32, ``-1`` on non-candidates.

    The mean query of every ``score_group`` rows scores the mean key of every candidate
    key block; the softmax weights over candidates, summed over the query block, rank the
    key blocks (MInference/XAttention-style pooling). Products run in the inputs' dtype (a
    bf16 matmul on the GPU), the softmax in fp32.
    """
    bsz, hq, c = blocks.shape
    hkv, dim = pooled.k.shape[1], pooled.k.shape[-1]
    groups = pooled.q.shape[3]
    qp = pooled.q.gather(2, blocks.view(bsz, hq, c, 1, 1).expand(-1, -1, -1, groups, dim))
    logits = (qp.reshape(bsz, hkv, -1, dim) @ pooled.k.transpose(-1, -2)).float()
    logits = logits.reshape(bsz, hq, c, groups, plan.nkb) * scale
    cand = plan.candidates(blocks)  # (B, Hq, c, nkb)
    weights = torch.softmax(logits.masked_fill(~cand.unsqueeze(3), float("-inf")), dim=-1).nan_to_num(0.0)
    score = (weights * _per_head(pooled.valid, blocks).unsqueeze(-1)).sum(3)
    return torch.where(cand, score, -1.0)


def rank_blocks(scores: Tensor, count: int) -> Tensor:
    """The ``count`` best candidate key blocks of each query block, best first: ``(B, Hq, nqb, count)``, ``-1`` past the candidates."""
    count = min(count, scores.shape[-1])
    values, index = torch.topk(scores, count, dim=-1)
    return torch.where(values > -0.5, index, -1)


def probe_rows(plan: Plan, seed: int, batch: int, heads: Tensor, probe_blocks: int, rows_per_block: int) -> Tensor:
    """Probe rows of every chunk, ``(B, Hq, num_chunks, probe_blocks * rows_per_block)`` long, ``-1`` where none.

    Each chunk's probe rows lie in ``probe_blocks`` random approximate query blocks of the
    chunk, one in each of ``probe_blocks`` equal strata, ``rows_per_block`` random rows in each (rows of one block share its selection,
    so the guard's trials gather each block's keys once). ``heads: (Hq,)`` global head ids.
    """
    device = heads.device
    nc, cb = plan.num_chunks, plan.chunk_blocks
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1, 1)
    h = heads.view(1, -1, 1, 1, 1)
    c = torch.arange(nc, device=device).view(1, 1, -1, 1, 1)
    p = torch.arange(probe_blocks, device=device).view(1, 1, 1, -1, 1)
    r = torch.arange(rows_per_block, device=device).view(1, 1, 1, 1, -1)
    lo = torch.clamp(c * cb, min=plan.first)
    hi = torch.clamp((c + 1) * cb, max=plan.nqb)
    span = (hi - lo).clamp(min=0)
    # Block p lies in the p-th of probe_blocks equal strata of the chunk: distinct blocks
    # (when the chunk has that many), so the blocks that find heavy columns are never the
    # ones that estimate the error.
    blk = lo + ((p + uniforms(seed, 1, b, h, c, p)) * span / probe_blocks).long()
    start = blk * plan.block
    rows = start + (uniforms(seed, 2, b, h, c, p, r) * torch.clamp(plan.nq - start, max=plan.block)).long()
    rows = torch.where(span > 0, rows, -1)
    return rows.reshape(batch, len(heads), nc, -1)


def heavy_range(plan: Plan, span: int | None, device=None) -> tuple[Tensor, Tensor]:
    """Keys ``[lo[c], hi[c])`` that chunk ``c``'s finding probe rows scan for heavy columns, ``(C,)`` long each.

    Causal: from ``span`` keys before the chunk's first row's last key to the end (a row
    sees no key past its own anyway); not causal: ``span`` keys on each side of the chunk's
    rows mapped onto the keys (as the windows' centres are). ``None``: every key. The scan
    then costs O(N (span + chunk)) instead of O(N^2 / chunk); heavy columns further back come
    from the earlier chunks (:func:`carried_columns`).
    """
    # Built where it is used: a host table copied per call would wait for the GPU.
    c = torch.arange(plan.num_chunks, device=device)
    rows = plan.chunk_blocks * plan.block
    if span is None:
        lo, hi = torch.zeros_like(c), torch.full_like(c, plan.nk)
    elif plan.causal:
        lo, hi = torch.clamp(c * rows + plan.offset - span, min=0), torch.full_like(c, plan.nk)
    else:
        nq = max(plan.nq, 1)
        start = c * rows * plan.nk // nq
        end = -(-torch.clamp((c + 1) * rows, max=plan.nq) * plan.nk // nq)
        lo, hi = torch.clamp(start - span, min=0), torch.clamp(end + span, max=plan.nk)
    return lo, hi


def span_cuts(plan: Plan, span: int | None) -> bool:
    """Whether ``span`` leaves out a key of some chunk's finding rows (``heavy_range`` short of every key they
    see). Where it leaves none out, no chunk has carried columns (``carried_columns``: before its range), so
    the scan is the full one and the carried step is skipped: at 32k on an H100, host-bound there, that step
    cost 3.4 ms of a 10 ms call."""
    if span is None:
        return False
    lo, hi = heavy_range(plan, span)
    return bool((lo > 0).any() or (hi < plan.nk).any())


def _row_scores(q: Tensor, k: Tensor, rows: Tensor, scale: float, plan: Plan, k0: int, k1: int,
                lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """Logits of ``rows (B, Hq, R)`` (``-1``: none) against keys ``[k0, k1)``, fp32, ``-inf`` where not seen
    (or, given ``lo, hi (R,)``, outside each row's keys ``[lo, hi)``)."""
    bsz, hq, _, dim = q.shape
    hkv = k.shape[1]
    q_rows = q.gather(2, rows.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, dim))
    s = (q_rows.reshape(bsz, hkv, -1, dim) @ k[:, :, k0:k1].transpose(-1, -2)).float().reshape(bsz, hq, -1, k1 - k0)
    s = s * scale
    # Rows -1 (chunks with no approximate rows) see no key, whatever the causal offset.
    limit = torch.where(rows >= 0, rows + plan.offset if plan.causal else plan.nk - 1, -1)
    cols = torch.arange(k0, k1, device=q.device)
    hidden = cols > limit.unsqueeze(-1)
    if lo is not None:
        hidden = hidden | (cols < lo.unsqueeze(-1)) | (cols >= hi.unsqueeze(-1))
    return s.masked_fill(hidden, float("-inf"))


def finders(p: int, probe_blocks: int, device) -> Tensor:
    """``(p,)`` bool: the probe rows that find heavy columns, those of the even probe blocks.

    Probe block ``i`` lies in stratum ``i`` of the chunk (:func:`probe_rows`), so the finding
    and the estimating blocks alternate along the chunk.
    """
    rows_per_block = max(1, p // probe_blocks)
    return (torch.arange(p, device=device) // rows_per_block) % 2 == 0


def estimating_rows(rows: Tensor, probe_blocks: int) -> Tensor:
    """``(B, Hq, C, P)`` bool: the probe rows that estimate the error (odd probe blocks, present)."""
    return (rows >= 0) & ~finders(rows.shape[-1], probe_blocks, rows.device)


def probe_exact(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, rows: Tensor, heavy: int,
                num_sinks: int, probe_blocks: int, need_out: bool = True, span: int | None = None
                ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """Exact attention of the probe rows and each chunk's heavy columns.

    ``rows: (B, Hq, C, P)`` from :func:`probe_rows`. Returns ``out (B, Hq, C, P, D)`` fp32
    of the estimating rows (0 on the finding rows: only the error estimate reads it, and
    on CUDA their values are then never read, a third less work), ``lse (B, Hq, C, P)``, ``heavy (B, Hkv, C, heavy)`` key indices (``-1`` where fewer) and
    the scores computed per head (a float64 tensor). With ``need_out`` False only the
    heavy columns are wanted (no guard, no stats): only the finding rows are scored, ``out``
    is ``None``, the estimating rows' ``lse`` is ``-inf`` and the scores are not counted
    (``None``; only the stats read them).

    A chunk's heavy columns are the ``heavy`` keys outside the sinks with the largest
    summed softmax weight over the rows of the chunk's even probe blocks (:func:`finders`),
    for all query heads of the KV head: its vertical lines (delimiters, sinks past
    ``num_sinks``), found from rows of the chunk alone. The other probe blocks estimate the
    error (:func:`estimating_rows`): rows, or blocks, that chose the heavy columns find
    their own keys there and report a smaller error than the rest of the chunk sees
    (measured: estimates of 0.01-0.04 for heads at 0.15-0.40). The finding rows scan only
    the keys of :func:`heavy_range` (``span``) and, where it leaves keys out, the columns
    earlier chunks found (:func:`carried_columns`); their ``lse`` is over both. The heavy
    columns are then the top of the carried columns and the ``RESCORED * heavy`` near ones
    with the most mass over the span, weighed again under that softmax. The estimating rows
    score every key they see. Keys are streamed in pieces: two passes (log-sum-exp, then
    weights).
    """
    bsz, hq, nc, p = rows.shape
    hkv = k.shape[1]
    find = finders(p, probe_blocks, rows.device)
    if not need_out:
        rows = torch.where(find, rows, -1)
    flat = rows.reshape(bsz, hq, nc * p)
    # Each row's keys [lo, hi): the chunk's heavy range for finding rows, all keys otherwise.
    h_lo, h_hi = heavy_range(plan, span, q.device)
    lo = torch.where(find, h_lo.unsqueeze(-1), 0).reshape(-1)
    hi = torch.where(find, h_hi.unsqueeze(-1), plan.nk).reshape(-1)
    lse = torch.full((bsz, hq, nc * p), float("-inf"), device=q.device)
    for k0, k1 in _pieces(plan.nk, bsz * hq * nc * p):
        s = _row_scores(q, k, flat, scale, plan, k0, k1, lo, hi)
        lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
    count = min(heavy, plan.nk)
    carried = None
    if count and span_cuts(plan, span):
        # The columns found near each chunk (its top RESCORED * count by mass over its own
        # keys), the top count of them carried to the later chunks as candidates
        # (carried_columns); the finding rows' softmax then runs over their keys and the
        # carried columns.
        near, near_mass = _top_mass(q, k, flat, scale, plan, lo, hi, lse, find, min(RESCORED * count, plan.nk),
                                    num_sinks, hkv, with_mass=True)
        carried = carried_columns(near[..., :count], near_mass[..., :count], plan, span, CARRIED * count)
        columns = torch.cat([carried, near], dim=-1)
        s_c = carried_scores(q, k, flat, columns, scale, find, plan)
        lse = torch.logaddexp(lse, torch.logsumexp(s_c[..., :carried.shape[-1]], dim=-1))
    out = None
    if need_out:
        shift = torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1)
        out = torch.zeros(bsz, hq, nc * p, v.shape[-1], device=q.device)
        for k0, k1 in _pieces(plan.nk, bsz * hq * nc * p):
            w = torch.exp(_row_scores(q, k, flat, scale, plan, k0, k1, lo, hi) - shift)
            out += (w.reshape(bsz, hkv, -1, k1 - k0).to(v.dtype) @ v[:, :, k0:k1]).float().reshape(bsz, hq, nc * p, -1)
        out = torch.where(find.view(-1, 1), 0.0, out.reshape(bsz, hq, nc, p, -1))
    heavy_idx = torch.full((bsz, hkv, nc, count), -1, dtype=torch.long, device=q.device)
    if count and carried is not None:
        # The heavy columns: the count candidates (near or carried) with the most mass under
        # that softmax; a column past the near candidates has too little mass to rank.
        mass_c = torch.exp(s_c - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
        mass_c = (mass_c.reshape(bsz, hkv, hq // hkv, nc, p, -1) * find.float().view(-1, 1)).sum((2, 4))
        heavy_idx = top_candidates(mass_c, columns, count)
    elif count:
        heavy_idx = _top_mass(q, k, flat, scale, plan, lo, hi, lse, find, count, num_sinks, hkv)
    pairs = None
    if need_out:
        pairs = probe_pairs(plan, flat, lo, hi, carried, find)
    return out, lse.reshape(bsz, hq, nc, p), heavy_idx, pairs


def _top_mass(q: Tensor, k: Tensor, flat: Tensor, scale: float, plan: Plan, lo: Tensor, hi: Tensor, lse: Tensor,
              find: Tensor, count: int, num_sinks: int, hkv: int, with_mass: bool = False
              ) -> Tensor | tuple[Tensor, Tensor]:
    """The ``count`` keys outside the sinks with the largest summed softmax weight of each chunk's finding rows
    (``flat (B, Hq, C * P)`` over keys ``[lo, hi)``, normalised by ``lse``), per KV head: ``(B, Hkv, C, count)``,
    ``-1`` where fewer have weight, in descending mass. ``with_mass``: their summed weights too (0 where -1)."""
    bsz, hq, n = flat.shape
    p = find.shape[0]
    nc = n // p
    shift = torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1)
    best = torch.full((bsz, hkv, nc, 0), -1.0, device=q.device)
    best_idx = torch.zeros((bsz, hkv, nc, 0), dtype=torch.long, device=q.device)
    for k0, k1 in _pieces(plan.nk, bsz * hq * n):
        w = torch.exp(_row_scores(q, k, flat, scale, plan, k0, k1, lo, hi) - shift)
        # Heavy columns are per KV head: the mass of all its query heads' probe rows.
        mass = (w.reshape(bsz, hkv, hq // hkv, nc, p, k1 - k0) * find.float().view(-1, 1)).sum((2, 4))
        mass[..., :max(0, num_sinks - k0)] = 0.0
        keys = torch.arange(k0, k1, device=q.device).expand_as(mass)
        values = torch.cat([best, mass], dim=-1)
        index = torch.cat([best_idx, keys], dim=-1)
        best, pick = torch.topk(values, min(count, values.shape[-1]), dim=-1)
        best_idx = index.gather(-1, pick)
    out = torch.full((bsz, hkv, nc, count), -1, dtype=torch.long, device=q.device)
    out[..., :best.shape[-1]] = torch.where(best > 0, best_idx, -1)
    if not with_mass:
        return out
    mass = torch.zeros(out.shape, device=q.device)
    mass[..., :best.shape[-1]] = torch.clamp(best, min=0.0)
    return out, mass


def carried_columns(near: Tensor, mass: Tensor, plan: Plan, span: int, count: int) -> Tensor:
    """Each chunk's carried candidates ``(B, Hkv, C, count)``: of the heavy columns ``near (B, Hkv, C, H)`` that
    the earlier chunks found within their own span (their column mass ``mass``, same shape), the ``count`` with
    the most mass summed over those chunks, before this chunk's range (``heavy_range``), ascending, each once,
    ``-1`` after them.

    A vertical line (a delimiter every later row weighs) is found by the chunks near it and
    carried to every later chunk, so a span loses none that an earlier chunk saw: at 8k on
    the held-out text (1,024-row chunks, a span of 1,024) this matched the full scan's error
    on every layer, where the span alone took layers 3-10 from 0.03-0.14 to 0.23-0.32
    (docs/QUALITY.md). Ranked by summed mass, the lines that chunk after chunk weighs stay
    and a column one chunk found once gives way: ``count`` bounds the logits the finding rows
    add (every earlier chunk's columns, C H per chunk, cost 140 ms at 1M on an H100, more than
    the span saved). Chunk-causal: chunk ``c`` reads chunks before it only. The table of
    each chunk's mass on every column found is ``(B, Hkv, C, C H)``: O(N^2 / chunk^2).
    """
    bsz, hkv, nc, h = near.shape
    lo, _ = heavy_range(plan, span, near.device)
    keys = torch.where(near >= 0, near, plan.nk).reshape(bsz, hkv, nc * h)
    weight = torch.where(near >= 0, mass, 0.0).float()
    # Each distinct column found gets an id (its rank among them); a chunk's picks are distinct.
    sorted_keys, order = torch.sort(keys, dim=-1)
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[..., 1:] = sorted_keys[..., 1:] != sorted_keys[..., :-1]
    ident = first.long().cumsum(-1) - 1
    column = torch.full_like(keys, plan.nk).scatter_(-1, ident, sorted_keys)  # the key of each id
    pick_id = torch.empty_like(ident).scatter_(-1, order, ident).view(bsz, hkv, nc, h)
    table = torch.zeros(bsz, hkv, nc, nc * h, device=near.device).scatter_add_(-1, pick_id, weight)
    # Summed over the chunks before each one alone (an exclusive prefix: exact zeros elsewhere).
    before = torch.cat([torch.zeros_like(table[:, :, :1]), table[:, :, :-1]], dim=2).cumsum(2)
    before = torch.where(column.unsqueeze(2) < lo.view(1, 1, nc, 1), before, 0.0)
    top, pick = torch.topk(before, min(count, nc * h), dim=-1)
    cand = torch.where(top > 0, column.unsqueeze(2).expand(-1, -1, nc, -1).gather(-1, pick), plan.nk)
    cand = cand.sort(-1).values
    out = torch.full((bsz, hkv, nc, count), -1, dtype=torch.long, device=near.device)
    out[..., :cand.shape[-1]] = torch.where(cand >= plan.nk, -1, cand)
    return out


def carried_scores(q: Tensor, k: Tensor, flat: Tensor, columns: Tensor, scale: float, find: Tensor, plan: Plan
                   ) -> Tensor:
    """Logits of the finding rows ``flat (B, Hq, C * P)`` against their chunk's candidate columns ``(B, Hkv, C, M)``
    (carried, or near and scored again): ``(B, Hq, C * P, M)`` fp32, ``-inf`` for other rows, rows ``-1``,
    padding (``-1``) and, causal, columns past the row."""
    bsz, hq, n = flat.shape
    hkv, nc, m = columns.shape[1], columns.shape[2], columns.shape[3]
    p, dim = n // nc, q.shape[-1]
    q_rows = q.gather(2, flat.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, dim))
    q_rows = q_rows.reshape(bsz, hkv, hq // hkv, nc, p, dim)
    k_c = k.gather(2, columns.clamp(min=0).reshape(bsz, hkv, nc * m, 1).expand(-1, -1, -1, dim))
    s = torch.einsum("bhgcpd,bhcmd->bhgcpm", q_rows, k_c.reshape(bsz, hkv, nc, m, dim)).float() * scale
    rows = flat.view(bsz, hkv, hq // hkv, nc, p, 1)
    hidden = (columns < 0).view(bsz, hkv, 1, nc, 1, m) | (rows < 0) | ~find.view(1, 1, 1, 1, p, 1)
    if plan.causal:
        hidden = hidden | (columns.view(bsz, hkv, 1, nc, 1, m) > rows + plan.offset)
    return s.masked_fill(hidden, float("-inf")).reshape(bsz, hq, n, m)


def top_candidates(mass: Tensor, columns: Tensor, count: int) -> Tensor:
    """The ``count`` columns ``(B, Hkv, C, M)`` (``-1``: none) with the largest ``mass`` (same shape), ``-1`` where
    fewer have any: ``(B, Hkv, C, count)``."""
    out = torch.full((*columns.shape[:-1], count), -1, dtype=torch.long, device=columns.device)
    values, pick = torch.topk(torch.where(columns >= 0, mass, 0.0), min(count, columns.shape[-1]), dim=-1)
    out[..., :values.shape[-1]] = torch.where(values > 0, columns.gather(-1, pick), -1)
    return out


@dataclass(frozen=True)
class Lsh:
    """Each row's LSH block as a range of bucket-sorted key slots.

    ``order (B, Hkv, Nk)``: key positions sorted by (bucket, position); ``slot (B, Hkv, Nk)``
    its inverse; ``lo, hi (B, Hq, Nq)``: row ``r`` takes the keys at slots ``[lo, hi)``
    outside its block's exact blocks (empty where ``lo >= hi``); ``q_order (B, Hkv, G Nq)``
    (``G = Hq / Hkv``): the rows of each KV head's query heads, numbered ``g * Nq + r`` (row
    ``r`` of the group's head ``g``, the index of ``lo`` viewed as ``(B, Hkv, G Nq)``), sorted
    by (bucket, position, head): the order of the kernels' LSH pass. A group's heads share
    the sorted keys, and rows of one bucket and block share their range, so one tile of
    sorted rows spans fewer key slots with the group's heads together (tiles of 64 rows and
    32 slots, 4 heads a group, random input at 131k: 2.0 slots scored per slot used, against
    3.5 with one head's rows alone).
    """

    order: Tensor
    slot: Tensor
    lo: Tensor
    hi: Tensor
    q_order: Tensor


def lsh_ranges(q: Tensor, k: Tensor, plan: Plan, lsh_block: int, num_projs: int, seed: int) -> Lsh:
    """Every row's LSH block (:class:`Lsh`); rows of exact blocks (before ``plan.first``) get none.

    Causal: the ``lsh_block`` most recent keys of the row's bucket before its block's
    window; not causal: the ``lsh_block`` keys of the bucket nearest the block's position.
    Both are decided by keys before the window (causal), so later tokens do not move them.
    The one exception: the kernels attend bucket-sorted blocks of ``block`` rows (of the KV
    head's query heads together, :class:`Lsh`) over at most :data:`LSH_TILES` tiles of
    sorted keys, so a row whose range reaches further back than ``LSH_TILES * block`` slots
    before the furthest range end of its sorted block is cut there (here too, so both paths
    compute one function). Sorted blocks that wide hold rows of buckets with thousands of
    keys between them; then, and only then, which keys a row takes can depend on rows after
    it, or on the other heads of its group.
    """
    proj = draw_projections(q.shape[-1], num_projs, torch.Generator().manual_seed(seed))
    return bucket_ranges(lsh_buckets(q, proj), lsh_buckets(k, proj), plan, lsh_block)


def bucket_ranges(q_bucket: Tensor, k_bucket: Tensor, plan: Plan, lsh_block: int) -> Lsh:
    """:func:`lsh_ranges` from the buckets of the rows ``(B, Hq, Nq)`` and of the keys ``(B, Hkv, Nk)``."""
    bsz, hq, nq = q_bucket.shape
    hkv, nk = k_bucket.shape[1], k_bucket.shape[2]
    group = hq // hkv
    pos = torch.arange(nk, device=k_bucket.device)
    composite, order = torch.sort(k_bucket * nk + pos, dim=-1)
    slot = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))
    rows = torch.arange(nq, device=q_bucket.device)
    block = rows // plan.block
    if plan.causal:
        anchor = plan.win_lo.to(q_bucket.device)[block] * plan.block
    else:
        anchor = torch.clamp(block * plan.block * nk // max(nq, 1), max=nk - 1)

    def find(values):  # slots of the first key >= values, per KV head
        return torch.searchsorted(composite, values.reshape(bsz, hkv, group * nq).contiguous()).reshape(bsz, hq, nq)

    start, end, e = find(q_bucket * nk), find((q_bucket + 1) * nk), find(q_bucket * nk + anchor)
    if plan.causal:
        lo, hi = torch.maximum(e - lsh_block, start), e
    else:
        lo = torch.maximum(torch.minimum(e - lsh_block // 2, end - lsh_block), start)
        hi = torch.minimum(lo + lsh_block, end)
    active = (block >= plan.first) & (lsh_block > 0)
    lo, hi = torch.where(active, lo, 0), torch.where(active, hi, 0)
    q_order = sorted_rows(q_bucket, hkv)
    # Cut each sorted block's ranges to the LSH_TILES tiles ending at its furthest slot.
    lo_s, _, _, hi_max = sorted_spans(q_order, lo, hi, plan.block, nk)
    floor = torch.clamp((hi_max + plan.block - 1) // plan.block - LSH_TILES, min=0) * plan.block
    floor = floor.repeat_interleave(plan.block, dim=-1)[..., :group * nq]
    lo = torch.empty_like(lo_s).scatter_(-1, q_order, torch.maximum(lo_s, floor)).reshape(bsz, hq, nq)
    hi = torch.maximum(hi, lo)
    return Lsh(order, slot, lo, hi, q_order)


def sorted_spans(q_order: Tensor, lo: Tensor, hi: Tensor, tile: int, nk: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows' ranges in :attr:`Lsh.q_order`, and the key slots each tile of ``tile`` sorted rows spans.

    ``q_order (B, Hkv, G Nq)``; ``lo, hi (B, Hq, Nq)``. Returns the sorted rows' ``lo_s,
    hi_s (B, Hkv, G Nq)`` and each tile's ``start, end (B, Hkv, tiles)``: the least start
    and the greatest end of its rows' non-empty ranges (``nk`` and ``0`` where it has none).
    The cut here, and the kernels' LSH tiles, take their spans from it.
    """
    bsz, hkv, n_rows = q_order.shape
    lo_s = lo.reshape(bsz, hkv, n_rows).gather(-1, q_order)
    hi_s = hi.reshape(bsz, hkv, n_rows).gather(-1, q_order)
    busy = lo_s < hi_s
    pad = -(-n_rows // tile) * tile - n_rows
    start = torch.nn.functional.pad(torch.where(busy, lo_s, nk), (0, pad), value=nk).reshape(bsz, hkv, -1, tile)
    end = torch.nn.functional.pad(torch.where(busy, hi_s, 0), (0, pad)).reshape(bsz, hkv, -1, tile)
    return lo_s, hi_s, start.amin(-1), end.amax(-1)


def sorted_rows(q_bucket: Tensor, kv_heads: int) -> Tensor:
    """:attr:`Lsh.q_order` from the rows' buckets ``(B, Hq, Nq)``: each KV head's rows by (bucket, position, head)."""
    bsz, hq, nq = q_bucket.shape
    group = hq // kv_heads
    idx = torch.arange(group * nq, device=q_bucket.device)
    key = q_bucket.reshape(bsz, kv_heads, group * nq) * (group * nq) + (idx % nq) * group + idx // nq
    return torch.sort(key, dim=-1).indices


@dataclass(frozen=True)
class Selection:
    """What query blocks ``blocks (B, Hq, c)`` score besides their rows' LSH blocks.

    ``exact_blocks (B, Hq, c, E)``: key blocks scored exactly (window then top blocks,
    ``-1`` padding); ``active (B, Hq, c)``: blocks that approximate (the others, before
    ``min_seq_len`` or in chunks the guard sent to exact, attend nothing here);
    ``gather_idx, gather_logw (B, Hkv, C, S)``: each chunk's gathered columns (sinks, heavy
    columns, residual samples), shared by the query heads of a KV head, and their natural
    log-weights (``-inf``: unused). Query block ``j`` of head ``h`` takes the columns of its
    chunk whose key block is one of its candidates and not in its exact blocks (its
    complement ``C_j``), minus each row's LSH block.
    """

    blocks: Tensor
    exact_blocks: Tensor
    active: Tensor
    gather_idx: Tensor
    gather_logw: Tensor


def exact_blocks(plan: Plan, blocks: Tensor, ranked: Tensor, key_blocks: Tensor | int) -> Tensor:
    """Window blocks then the first ``key_blocks (B, Hq, c)`` of ``ranked (B, Hq, c, K)``: ``(B, Hq, c, E)``, ``-1`` padding.

    An int ``key_blocks`` is every block's count: the first ``key_blocks`` columns of
    ``ranked`` (the tensor form keeps all ``K`` columns, the unused ones ``-1``).
    """
    device = blocks.device
    if isinstance(key_blocks, int):
        top = ranked[..., :key_blocks]
    else:
        top = torch.where(torch.arange(ranked.shape[-1], device=device) < key_blocks.unsqueeze(-1), ranked, -1)
    return torch.cat([_per_head(plan.win_blocks, blocks), top], dim=-1)


def chunk_candidates(plan: Plan, device) -> Tensor:
    """``(C, nkb)`` bool: key blocks a candidate of some approximate query block of each chunk."""
    j = torch.arange(plan.nqb, device=device)
    cand = plan.candidates(j)  # (nqb, nkb)
    pad = plan.num_chunks * plan.chunk_blocks - plan.nqb
    cand = torch.nn.functional.pad(cand, (0, 0, 0, pad))
    return cand.reshape(plan.num_chunks, plan.chunk_blocks, -1).any(1)


def gather_columns(plan: Plan, chunk_scores: Tensor, heavy: Tensor, samples: Tensor, m_max: int, num_sinks: int,
                   sample_mix: float, seed: int, kv_heads: Tensor) -> tuple[Tensor, Tensor]:
    """Each chunk's gathered columns and log-weights, ``(B, Hkv, C, S)`` with ``S = num_sinks + H + m_max``.

    ``chunk_scores (B, Hkv, C, nkb)``: the block scores of the chunk's query blocks summed
    over them and over the KV head's query heads; ``heavy (B, Hkv, C, H)``; ``samples
    (B, Hkv, C)``: residual samples ``m_c`` of each chunk (``<= m_max``). The residual is drawn
    from the chunk's candidate keys by stratified sampling: stratum ``r`` of ``m_c`` takes
    ``u = (r + U) / m_c`` on the CDF of a proposal over candidate key blocks (``sample_mix``
    uniform over keys, the rest by ``chunk_scores``), then a key uniformly in the block;
    its log-weight is ``log(1 / (m_c pi(key)))``. Every candidate key has ``pi > 0``, so for
    each query block the columns inside its complement estimate the complement's sum
    without bias. With ``m_c >=`` the candidate keys, every candidate is taken once with
    weight 1 (exact). Sinks and heavy columns have log-weight 0; a sample equal to one of
    them is dropped (``-inf``: that column is exact already).
    """
    device = chunk_scores.device
    bsz, hkv, nc, nkb = chunk_scores.shape
    t = plan.block
    sizes, csum, cand_keys, pi, cdf = residual_proposal(plan, chunk_scores, sample_mix)
    sinks = torch.arange(min(num_sinks, plan.nk), device=device).expand(bsz, hkv, nc, -1)
    fixed = torch.cat([sinks, heavy], dim=-1)
    fixed_logw = torch.where(fixed >= 0, 0.0, float("-inf"))
    r = torch.arange(m_max, device=device)
    full = samples >= cand_keys  # every candidate once, weight 1
    csum = csum.expand(bsz, hkv, -1, -1).contiguous()
    e_blk = torch.searchsorted(csum, r.expand(bsz, hkv, nc, -1).contiguous(), right=True).clamp(max=nkb - 1)
    e_key = e_blk * t + r - (csum.gather(-1, e_blk) - sizes[e_blk])
    b_ix = torch.arange(bsz, device=device).view(-1, 1, 1, 1)
    h_ix = kv_heads.view(1, -1, 1, 1)
    c_ix = torch.arange(nc, device=device).view(1, 1, -1, 1)
    u = (r + uniforms(seed, 3, b_ix, h_ix, c_ix, r)) / samples.clamp(min=1).unsqueeze(-1) * cdf[..., -1:]
    s_blk = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=nkb - 1)
    p_blk = pi.gather(-1, s_blk)
    prev = cdf.gather(-1, s_blk) - p_blk
    size = sizes[s_blk]
    offset = torch.minimum(((u - prev) / p_blk.clamp(min=1e-300) * size).long(), size - 1).clamp(min=0)
    s_logw = (torch.log(size.double()) - torch.log(samples.clamp(min=1).double()).unsqueeze(-1)
              - torch.log(p_blk.clamp(min=1e-300))).float()
    key = torch.where(full.unsqueeze(-1), e_key, s_blk * t + offset)
    logw = torch.where(full.unsqueeze(-1), 0.0, s_logw)
    ok = (r < torch.minimum(samples, cand_keys).unsqueeze(-1)) & (cand_keys > 0).unsqueeze(-1)
    ok &= ~((key < num_sinks) | ((key.unsqueeze(-1) == heavy.unsqueeze(-2)) & (heavy >= 0).unsqueeze(-2)).any(-1))
    idx = torch.cat([fixed.clamp(min=0), torch.where(ok, key, 0)], dim=-1)
    return idx, torch.cat([fixed_logw, torch.where(ok, logw, float("-inf"))], dim=-1)


def proposal_tables(plan: Plan, device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The part of :func:`residual_proposal` fixed by the plan: each chunk's candidate key
    blocks ``(C, nkb)``, the block sizes ``(nkb,)``, the cumulative candidate keys ``(C, nkb)``,
    their total per chunk ``(C,)`` and the uniform share of each block ``(C, nkb)`` float64."""
    cand = chunk_candidates(plan, device)
    sizes = plan.block_sizes(device)
    csum = torch.cumsum(cand * sizes, dim=-1)
    cand_keys = csum[:, -1]
    share = sizes.double() * cand / cand_keys.clamp(min=1).unsqueeze(-1).double()
    return cand, sizes, csum, cand_keys, share


def residual_proposal(plan: Plan, chunk_scores: Tensor, sample_mix: float, tables: tuple | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The residual samples' proposal over key blocks (:func:`gather_columns`).

    Returns the block sizes ``(nkb,)``, the cumulative candidate keys ``(C, nkb)`` and
    their total per chunk ``(C,)``, and the proposal ``pi`` with its CDF, ``(B, Hkv, C, nkb)``
    float64: ``sample_mix`` uniform over the chunk's candidate keys, the rest by
    ``chunk_scores``. ``tables``: :func:`proposal_tables` of the plan, if already built.
    """
    cand, sizes, csum, cand_keys, share = tables if tables is not None else proposal_tables(plan, chunk_scores.device)
    score = torch.where(cand, chunk_scores.clamp(min=0), 0.0).double()
    total = score.sum(-1, keepdim=True)
    guided = torch.where(total > 0, score / total.clamp(min=1e-300), share)
    pi = sample_mix * share + (1 - sample_mix) * guided  # proposal per key block
    return sizes, csum, cand_keys, pi, torch.cumsum(pi, dim=-1)


def probe_pairs(plan: Plan, rows: Tensor, lo: Tensor, hi: Tensor, carried: Tensor | None = None,
                find: Tensor | None = None) -> Tensor:
    """Keys the probe rows ``(B, Hq, R)`` score, each within its keys ``[lo, hi)`` ``(R,)``, and the finding rows
    (``find (P,)``) their chunk's ``carried`` columns ``(B, Hkv, C, M)`` too, per head on average (a float64
    tensor: no host sync)."""
    end = torch.minimum((rows + plan.offset + 1).clamp(0, plan.nk) if plan.causal else torch.full_like(rows, plan.nk),
                        hi)
    seen = torch.where(rows >= 0, (end - lo).clamp(min=0), 0)
    total = seen.sum(dtype=torch.float64)
    if carried is not None:
        bsz, hkv, nc = carried.shape[:3]
        per_chunk = (carried >= 0).sum(-1).double()
        present = ((rows >= 0).reshape(bsz, rows.shape[1], nc, -1) & find).sum(-1)
        total = total + (per_chunk * present.reshape(bsz, hkv, -1, nc).sum(2).double()).sum()
    return total / (rows.shape[0] * rows.shape[1])


def chunk_scores(scores: Tensor, first: int, plan: Plan, kv_heads: int) -> Tensor:
    """Block scores of query blocks ``first, first + 1, ...`` (``scores (B, Hq, c, nkb)``) summed per (batch, KV head,
    chunk): ``(B, Hkv, C, nkb)``.

    A reshape and a sum, not a scatter: CUDA's scatter_add adds in an arbitrary order, and
    these sums feed the residual samples' draws, so the same seed must give the same sums
    whatever the run or the number of heads in the call.
    """
    bsz, hq, c, nkb = scores.shape
    cb = plan.chunk_blocks
    lead = first % cb
    tail = -(lead + c) % cb
    values = torch.nn.functional.pad(scores.clamp(min=0), (0, 0, lead, tail))
    sums = values.reshape(bsz, kv_heads, hq // kv_heads, -1, cb, nkb).sum((2, 4))
    out = torch.zeros(bsz, kv_heads, plan.num_chunks, nkb, device=scores.device)
    out[:, :, first // cb:first // cb + sums.shape[2]] = sums
    return out
