"""Structured HyperAttention with an error guard (``method="structured"``), written for reading.

Real LLM heads put most of their mass on a few sink/delimiter columns, on the local
diagonal and on a few far blocks that neighbouring queries share; the paper's small-α
assumption fails there (DESIGN.md §3). This method scores those parts exactly and
*estimates* the rest without dropping it.

Queries are processed in blocks of ``query_block`` consecutive rows (64). For query
block ``j`` and head ``h`` (shape legend of :mod:`hyperattn.ops`):

1. **Block probe and block scores.** ``block_probes`` random rows of each query block
   (of at most ``_HEAVY_BLOCKS`` blocks, evenly spaced) are scored against every key they
   see; their summed softmax weights pick the head's heavy columns. The key blocks are
   ranked by block scores: the mean query of each ``score_group`` (8) consecutive rows
   scores the mean key of every key block it sees, and the softmax weights over key blocks
   are summed over the query block (MInference/XAttention-style pooling).
2. **Exact set** ``E_j``: the first ``num_sinks`` keys; a local window of ``window`` keys
   before the block plus the block's own diagonal; the ``heavy_columns`` columns with the
   largest mass over the probe rows (vertical lines shared by the head); and the
   ``key_blocks`` key blocks of ``key_block`` (64) keys with the largest block score not
   yet covered.
3. **LSH block** ``L_i`` per query: keys are sorted by (Gray-code bucket, position); query
   ``i`` takes the ``lsh_block`` most recent keys of its own bucket (and the neighbouring
   bucket) that lie before the window and outside ``E_j``. This finds a needle key that
   only this query matches, which the block probe can miss.
4. **Residual.** ``sample_size`` columns of the complement ``C_j`` (keys every query of
   the block sees, outside ``E_j``) are drawn by systematic sampling of a proposal that
   mixes uniform over ``C_j`` with the block scores (each key block's share spread over
   its keys in ``C_j``), each weighted ``1 / (m pi(c))`` (Hansen-Hurwitz: unbiased). A
   sampled column that is in the query's own ``L_i`` is masked (already counted exactly),
   so the estimate of ``sum_{c in C_j minus L_i} exp(s_ic)`` stays unbiased. With
   ``sample_size >= |C_j|`` every column is taken once with weight 1 and the result is
   exact.
5. The three parts merge through their log-sum-exp (:func:`~hyperattn.reference.exact.merge_lse`).

Rows that see at most ``min_seq_len`` keys (1024 by default) are exact, and so are the
probe rows of the error estimate, whose exact outputs are computed anyway.

**Error estimate and guard.** ``probe_rows`` random approximate rows per head, lying in 8
random query blocks, are scored exactly; ``est_error[b, h]`` is
``||O_approx - O_exact||_F / ||O_exact||_F`` over those rows, the estimator of DESIGN.md
§5's measured error (their output is then the exact one). With ``max_error`` set, every
head tries the budget tiers of :data:`_TIERS` (1/4x, 1/2x, 1x, 2x, 4x, 8x the key blocks
and samples) cheapest first, on its probe rows only, and runs once at the first tier
whose estimate is at most ``max_error``, or exactly if none is (``stats.exact_heads``).
Easy heads thus pay less than the base budget and hard heads more. A head's draws do not
depend on which other heads run with it, so the estimate it reports is the one the guard
decided on.

**Dependence on later tokens.** A row reads only values of keys it sees, but *which* keys
it scores depends on q/k of the whole call (heavy columns and block scores pool rows, the
LSH window spans every key's bucket, the guard decides per head): the method is for
inference, not for teacher-forced training.

**Budget.** ``stats.keys_per_query`` counts every (query, key) score computed for a
visible key: probe rows, block-probe rows, the exact set, the whole LSH block (masked
entries included, a kernel computes them) and the samples, plus the re-runs of the
guard, averaged over all query rows and heads.

Randomness comes from ``torch.Generator`` objects seeded with ``seed`` (:func:`draw_structured`),
so the kernels reproduce the reference's draws on the same device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .exact import attention_lse, merge_lse, softmax_lse
from .lsh import draw_projections, lsh_buckets

__all__ = ["Budget", "Selection", "StructuredDraws", "attend_blocks", "budget_from_config", "draw_structured",
           "heavy_columns", "select_blocks", "structured_attention",
           "structured_run", "first_approx_row", "run"]

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Budget:
    """Sizes of the parts of the structured method (see the module docstring)."""

    query_block: int = 64
    block_probes: int = 1
    key_block: int = 64
    key_blocks: int = 4
    window: int = 128
    num_sinks: int = 16
    heavy_columns: int = 64
    lsh_block: int = 32
    lsh_num_projs: int = 7
    sample_size: int = 256
    sample_mix: float = 0.3
    score_group: int = 8
    probe_rows: int = 64
    min_seq_len: int = 1024

    def scaled(self, factor: float) -> Budget:
        """A budget tier of the guard: ``factor`` times the key blocks and samples (rounded)."""
        return Budget(**{**self.__dict__, "key_blocks": round(self.key_blocks * factor),
                         "sample_size": round(self.sample_size * factor)})


def budget_from_config(config) -> Budget:
    """The :class:`Budget` a :class:`~hyperattn.config.HyperAttentionConfig` asks for."""
    return Budget(query_block=config.query_block, block_probes=config.block_probes, key_blocks=config.key_blocks,
                  window=config.window, num_sinks=config.num_sinks, heavy_columns=config.heavy_columns,
                  lsh_block=config.lsh_block, lsh_num_projs=config.lsh_num_projs,
                  sample_size=config.sample_size, sample_mix=float(config.sample_mix), score_group=config.score_group,
                  probe_rows=config.probe_rows, min_seq_len=config.effective_min_seq_len)


@dataclass(frozen=True)
class StructuredDraws:
    """Random inputs of one call, all uniforms in [0, 1) except ``proj``.

    ``proj: (D, r)`` LSH hyperplanes; ``probe_blocks: (8,)`` the query blocks that hold
    the probe rows; ``probe: (B, Hq, probe_rows)`` probe-row offsets inside them;
    ``block_probe: (B, Hq, nb, block_probes)`` row offsets inside each query block;
    ``samples: (B, Hq, nb, sample_size)`` stratum offsets.
    """

    proj: Tensor
    probe_blocks: Tensor
    probe: Tensor
    block_probe: Tensor
    samples: Tensor


def draw_structured(seed: int, head_dim: int, batch: int, heads: int, num_blocks: int, budget: Budget,
                    device: torch.device | str = "cpu") -> StructuredDraws:
    """Every random number of one call from generators seeded with ``seed``.

    The hyperplanes and probe positions come from a CPU generator, the same on every device;
    the residual stratum offsets, one per (head, query block, sample), from a generator on
    ``device``, so a long call does not draw millions of numbers on the CPU per guard tier.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    proj = draw_projections(head_dim, budget.lsh_num_projs, gen)
    probe_blocks = torch.rand(_PROBE_BLOCKS, generator=gen)
    probe = torch.rand(batch, heads, budget.probe_rows, generator=gen)
    block_probe = torch.rand(batch, heads, num_blocks, budget.block_probes, generator=gen)
    sample_gen = torch.Generator(device=device).manual_seed(seed + 1)
    samples = torch.rand(batch, heads, num_blocks, budget.sample_size, generator=sample_gen, device=device)
    return StructuredDraws(proj=proj, probe_blocks=probe_blocks, probe=probe, block_probe=block_probe, samples=samples)


def _gather_kv(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of ``x: (B, Hkv, Nk, D)`` at ``idx: (B, Hq, ...)`` -> ``(B, Hq, ..., D)``, without repeating K/V per head."""
    bsz, hkv, _, dim = x.shape
    hq = idx.shape[1]
    flat = idx.reshape(bsz, hkv, -1)
    out = x.gather(2, flat.unsqueeze(-1).expand(*flat.shape, dim))
    return out.reshape(bsz, hq, *idx.shape[2:], dim)


def _row_scores(q: Tensor, rows: Tensor, k: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """Scaled fp32 logits of the query ``rows: (B, Hq, R)`` (positions) against every key.

    Returns ``scores (B, Hq, R, Nk)``, ``-inf`` on keys a row does not see, and the number of
    keys each row sees ``(B, Hq, R)``.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    seen = (rows + (nk - nq) + 1).clamp(0, nk) if causal else torch.full_like(rows, nk)
    q_rows = q.gather(2, rows.unsqueeze(-1).expand(*rows.shape, dim)).float()
    scores = (q_rows.reshape(bsz, hkv, -1, dim) @ k.float().transpose(-1, -2)) * scale
    scores = scores.reshape(bsz, hq, rows.shape[-1], nk)
    return scores.masked_fill_(torch.arange(nk, device=k.device) >= seen.unsqueeze(-1), _NEG_INF), seen


def _rows_attention(q: Tensor, rows: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Exact attention of the query ``rows: (B, Hq, R)``.

    Returns ``out (B, Hq, R, D)``, ``lse (B, Hq, R)`` fp32 and the keys each row sees.
    """
    bsz, hq, r = rows.shape
    scores, seen = _row_scores(q, rows, k, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = probs.reshape(bsz, k.shape[1], -1, k.shape[2]) @ v.float()
    return out.reshape(bsz, hq, r, v.shape[-1]), lse, seen


# Query blocks whose block probe rows pick the heavy columns: all of them up to this many,
# else this many evenly spaced ones. The columns are shared by the whole head, so their
# cost stays O(Nk) per head however long the call.
_HEAVY_BLOCKS = 128

# Score elements one chunk of query blocks may materialise (selection and attention).
_CHUNK_ELEMENTS = 1 << 22

_BIG = 1 << 62

# Score elements of one chunk of block probe rows in :func:`heavy_columns`.
_HEAVY_ELEMENTS = 1 << 27


def _overlap(a0: Tensor, a1: Tensor, b0: Tensor, b1: Tensor) -> Tensor:
    """Length of ``[a0, a1) & [b0, b1)``, broadcast."""
    return (torch.minimum(a1, b1) - torch.maximum(a0, b0)).clamp(min=0)


def _geometry(nq: int, nk: int, r0: int, qb: int, causal: bool, blocks: Tensor):
    """First row, row end, visible key end and shared key end of each query block in ``blocks``.

    Keys ``< visible_end`` are seen by the block's last row, keys ``< shared_end`` by every row.
    """
    start = r0 + qb * blocks
    end = torch.clamp(start + qb, max=nq)
    if causal:
        offset = nk - nq
        return start, end, end + offset, start + offset + 1
    full = torch.full_like(start, nk)
    return start, end, full, full


def heavy_columns(q: Tensor, k: Tensor, scale: float, causal: bool, budget: Budget,
                  draws: StructuredDraws, r0: int) -> tuple[Tensor, float]:
    """The heavy columns of each head and the scores per head spent finding them.

    The block probe rows of the first ``_HEAVY_BLOCKS`` query blocks (evenly spaced ones
    past that) are scored against every key they see; the ``heavy_columns`` columns with
    the largest summed softmax weight (sinks excluded, weight > 0) are the head's vertical
    lines. Returns ``(B, Hq, heavy_columns)`` key indices, ``-1`` where there are fewer.
    """
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    count = min(budget.heavy_columns, nk)
    qb = budget.query_block
    num_blocks = math.ceil((nq - r0) / qb)
    if budget.block_probes == 0 or count == 0 or num_blocks == 0:
        return torch.full((bsz, hq, 0), -1, dtype=torch.long, device=q.device), 0.0
    pick = torch.arange(num_blocks) if num_blocks <= _HEAVY_BLOCKS else \
        torch.arange(_HEAVY_BLOCKS) * num_blocks // _HEAVY_BLOCKS
    start, end, _, _ = _geometry(nq, nk, r0, qb, causal, pick)
    start, end = start.to(q.device), end.to(q.device)
    u = draws.block_probe[:, :, pick].to(q.device)  # (B, Hq, P, R)
    rows = start.unsqueeze(-1) + (u * (end - start).unsqueeze(-1)).long()
    rows = torch.minimum(rows, (end - 1).unsqueeze(-1)).reshape(bsz, hq, -1)
    mass = torch.zeros(bsz, hq, nk, device=q.device)
    kf = k.float()
    pairs = 0.0
    step = max(1, _HEAVY_ELEMENTS // max(1, hq * nk))
    for c0 in range(0, rows.shape[-1], step):
        scores, seen = _row_scores(q, rows[..., c0:c0 + step], kf, scale, causal)
        mass += torch.softmax(scores, dim=-1).sum(2)
        pairs += float(seen.sum()) / (bsz * hq)
    mass[..., :budget.num_sinks] = 0.0
    values, index = torch.topk(mass, count, dim=-1)
    return torch.where(values > 0, index, -1), pairs


def pool_keys(k: Tensor, key_block: int) -> Tensor:
    """Mean key of every block of ``key_block`` keys: ``(B, Hkv, ceil(Nk / key_block), D)``."""
    bsz, hkv, nk, dim = k.shape
    nkb = math.ceil(nk / key_block)
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, nkb * key_block - nk)).reshape(bsz, hkv, nkb, key_block, dim)
    counts = torch.clamp(nk - key_block * torch.arange(nkb, device=k.device), max=key_block)
    return k_pad.sum(3) / counts.unsqueeze(-1)


def sort_keys_by_bucket(k: Tensor, proj: Tensor) -> tuple[Tensor, Tensor]:
    """Keys sorted by (Gray-code bucket, position): sorted composite keys and the order, ``(B, Hkv, Nk)``."""
    nk = k.shape[2]
    composite = lsh_buckets(k, proj) * nk + torch.arange(nk, device=k.device)
    return torch.sort(composite, dim=-1)


def _nth_missing(present: Tensor, rank: Tensor) -> Tensor:
    """The ``rank``-th (0-based) integer >= 0 not in ``present`` (sorted, distinct, ``_BIG``-padded), batched."""
    slots = torch.arange(present.shape[-1], device=present.device)
    gaps = torch.where(present < _BIG, present - slots, _BIG)  # integers missing before each entry
    return rank + torch.searchsorted(gaps, rank, right=True)


@dataclass(frozen=True)
class Selection:
    """What one chunk of ``c`` query blocks scores (rows of block ``j``: ``r0 + j * query_block + [0, qb)``).

    ``exact_idx (B, Hq, c, S)`` the exact set ``E_j`` in key order, padded with ``_BIG``;
    ``sample_idx, sample_logw (B, Hq, c, m)`` residual columns and natural log-weights
    (``-inf``: unused slot); ``lsh_idx (B, Hq, c, qb, L)`` each row's LSH block, the
    bucket-sorted key slots ``lsh_first + [0, L)`` of ``lsh_order (B, Hkv, Nk)`` (keys sorted
    by bucket, then position), and ``lsh_ok`` the entries that count (in ``C_j``).
    """

    blocks: Tensor
    exact_idx: Tensor
    sample_idx: Tensor
    sample_logw: Tensor
    lsh_idx: Tensor | None
    lsh_ok: Tensor | None
    lsh_first: Tensor | None = None
    lsh_order: Tensor | None = None


def block_scores(q: Tensor, k_pool: Tensor, nk: int, scale: float, causal: bool, r0: int, blocks: Tensor,
                 budget: Budget) -> tuple[Tensor, Tensor]:
    """Key-block scores of the query blocks ``blocks``: ``(B, Hq, c, ceil(Nk / key_block))`` and the scores computed.

    The mean query of every ``score_group`` rows scores the mean key of each key block it
    sees (``k_pool`` from :func:`pool_keys`); the softmax weights over key blocks, summed over
    the query block, rank the key blocks (MInference/XAttention-style pooling; pooling 8 rows
    changed no layer's error by more than 0.004). Rows past ``Nq`` count as zero vectors.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nkb = k_pool.shape[1], k_pool.shape[2]
    qb, kb, g = budget.query_block, budget.key_block, budget.score_group
    device = q.device
    blocks = blocks.to(device)
    c = len(blocks)
    start = r0 + qb * blocks
    rows = start.unsqueeze(-1) + torch.arange(qb, device=device)  # (c, qb)
    row_ok = rows < nq
    q_rows = q[:, :, rows.clamp(max=nq - 1)].float() * row_ok.unsqueeze(-1)  # (B, Hq, c, qb, D), zeros past Nq
    q_pool = q_rows.reshape(bsz, hq, c, qb // g, g, dim).mean(4)
    pooled = (q_pool.reshape(bsz, hkv, -1, dim) @ k_pool.transpose(-1, -2)).reshape(bsz, hq, c, qb // g, nkb)
    row_pos = start.unsqueeze(-1) + g * torch.arange(qb // g, device=device) + g - 1  # (c, qb/g)
    row_last = row_pos + (nk - nq) if causal else torch.full_like(row_pos, nk - 1)
    key0 = kb * torch.arange(nkb, device=device)
    seen = (key0 <= row_last.unsqueeze(-1)) & (row_pos - g + 1 < nq).unsqueeze(-1)  # (c, qb/g, nkb)
    pooled = torch.softmax((pooled * scale).masked_fill(~seen, _NEG_INF), dim=-1).nan_to_num(0.0)
    return pooled.sum(3), seen.sum().double()


def select_blocks(q: Tensor, k: Tensor, scale: float, causal: bool, budget: Budget, draws: StructuredDraws,
                  r0: int, blocks: Tensor, heavy: Tensor, k_pool: Tensor, lsh_keys: tuple[Tensor, Tensor] | None,
                  q_bucket: Tensor | None = None, score_fn=None) -> tuple[Selection, Tensor]:
    """Steps 1b-4 of the module docstring for the query blocks ``blocks``: the selection and its scores per head.

    ``heavy (B, Hq, H)`` from :func:`heavy_columns`, ``k_pool`` from :func:`pool_keys`,
    ``lsh_keys`` from :func:`sort_keys_by_bucket` with the sorted keys repeated per query
    head (``None``: no LSH block), ``q_bucket (B, Hq, Nq)`` every row's bucket (default:
    computed here), ``score_fn`` computes the block scores (default :func:`block_scores`; the
    kernels pass theirs). The score count is a 0-dim tensor (no device sync). Every part of
    a block's selection depends only on that block's rows, the heavy columns and the keys,
    so any subset of blocks gives the rows the full call gives.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    device = q.device
    qb, kb = budget.query_block, budget.key_block
    nkb = math.ceil(nk / kb)
    blocks = blocks.to(device)
    score_fn = block_scores if score_fn is None else score_fn
    if budget.lsh_block > 0 and q_bucket is None:
        q_bucket = lsh_buckets(q, draws.proj)
    c = len(blocks)
    start, end, vis_end, sh_end = _geometry(nq, nk, r0, qb, causal, blocks)
    offset = nk - nq
    rows = start.unsqueeze(-1) + torch.arange(qb, device=device)  # (c, qb)
    row_ok = rows < nq

    # 1b. Block scores (:func:`block_scores`).
    score, pairs = score_fn(q, k_pool, nk, scale, causal, r0, blocks, budget)
    key0 = kb * torch.arange(nkb, device=device)

    # 2. Exact set E_j: sinks, window + diagonal, heavy columns, then the key blocks with the
    #    largest score times their share of keys not yet in the set.
    key1 = torch.clamp(key0 + kb, max=nk)
    sink_end = torch.clamp(vis_end, max=budget.num_sinks)
    if causal:
        w0, w1 = torch.clamp(sh_end - 1 - budget.window, min=0), vis_end
    else:
        centre = torch.clamp(start + offset, 0, nk)
        w0 = torch.clamp(centre - budget.window // 2, min=0)
        w1 = torch.clamp(centre + qb + budget.window // 2, max=nk)
    zero = torch.zeros_like(w0)

    def per_key_block(a0, a1):  # (c, nkb) keys of [a0, a1) in each key block
        return _overlap(a0.unsqueeze(-1), a1.unsqueeze(-1), key0, key1)

    h = heavy.unsqueeze(2)  # (B, Hq, 1, H)
    heavy_ok = (h >= budget.num_sinks) & (h < vis_end.view(c, 1)) & ~((h >= w0.view(c, 1)) & (h < w1.view(c, 1)))
    heavy_per_block = torch.zeros(bsz, hq, c, nkb, device=device).scatter_add_(
        -1, (h.clamp(min=0) // kb).expand(-1, -1, c, -1), heavy_ok.float())
    taken = per_key_block(zero, sink_end) + per_key_block(w0, w1) - per_key_block(w0, torch.minimum(w1, sink_end))
    open_keys = per_key_block(zero, vis_end) - taken - heavy_per_block  # (B, Hq, c, nkb)
    count = min(budget.key_blocks, nkb)
    values, chosen = torch.topk(score * open_keys / kb, count, dim=-1)
    chosen_keys = (chosen.unsqueeze(-1) * kb + torch.arange(kb, device=device)).flatten(-2)
    chosen_ok = (values > 0).repeat_interleave(kb, dim=-1) & (chosen_keys < vis_end.view(c, 1))
    sinks = torch.arange(budget.num_sinks, device=device).expand(c, -1)
    window = w0.unsqueeze(-1) + torch.arange(qb + budget.window, device=device)
    parts = [
        torch.where(sinks < sink_end.unsqueeze(-1), sinks, _BIG).expand(bsz, hq, -1, -1),
        torch.where(window < w1.unsqueeze(-1), window, _BIG).expand(bsz, hq, -1, -1),
        torch.where((h >= 0) & (h < vis_end.view(c, 1)), h, _BIG).expand(-1, -1, c, -1),
        torch.where(chosen_ok, chosen_keys, _BIG),
    ]
    exact_idx = torch.sort(torch.cat(parts, dim=-1), dim=-1).values
    dup = torch.nn.functional.pad(exact_idx[..., 1:] == exact_idx[..., :-1], (1, 0))
    exact_idx = torch.sort(exact_idx.masked_fill(dup, _BIG), dim=-1).values
    if device.type == "cpu":  # trim the padding (on the GPU the kernel stops at each block's count, no sync)
        exact_idx = exact_idx[..., :max(1, int((exact_idx < _BIG).sum(-1).max()))].contiguous()
    in_set = exact_idx < _BIG
    row_limit = rows + offset if causal else torch.full_like(rows, nk - 1)
    seen_exact = torch.searchsorted(exact_idx, row_limit.expand(bsz, hq, -1, -1).contiguous(), right=True)
    pairs = pairs + (seen_exact * row_ok).sum() / (bsz * hq)

    # The complement C_j: keys every row of the block sees, outside E_j.
    below = in_set & (exact_idx < sh_end.view(c, 1))
    comp_count = sh_end.clamp(0, nk) - below.sum(-1)  # (B, Hq, c)
    open_c = per_key_block(zero, sh_end.clamp(0, nk)) - torch.zeros(bsz, hq, c, nkb, device=device).scatter_add_(
        -1, exact_idx.clamp(max=nk - 1) // kb, below.float())  # C_j keys per key block

    # 3. LSH block per row: the lsh_block keys ending at (bucket(q), last key before the window).
    lsh = budget.lsh_block
    lsh_idx = lsh_ok = first = k_order = None
    if lsh_keys is not None:
        sorted_comp, k_order = lsh_keys  # sorted_comp per query head, k_order per KV head
        q_bucket = q_bucket[:, :, rows.clamp(max=nq - 1)]  # (B, Hq, c, qb)
        anchor = (sh_end - 1 - budget.window - 1).clamp(min=0) if causal else torch.clamp(start + offset, 0, nk - 1)
        target = (q_bucket * nk + anchor.view(c, 1)).reshape(bsz, hq, -1)
        end_pos = torch.searchsorted(sorted_comp, target, right=True)
        first = (end_pos - lsh) if causal else (end_pos - lsh // 2)
        first = first.clamp(min=0, max=max(0, nk - lsh))
        span = min(lsh, nk)
        pos = (first.unsqueeze(-1) + torch.arange(span, device=device)).reshape(bsz, hkv, -1)
        lsh_idx = k_order.gather(2, pos).reshape(bsz, hq, c, qb, span)
        first = first.reshape(bsz, hq, c, qb)
        flat = lsh_idx.reshape(bsz, hq, c, -1)
        hit = torch.searchsorted(exact_idx, flat).clamp(max=exact_idx.shape[-1] - 1)
        in_exact = exact_idx.gather(-1, hit) == flat
        lsh_ok = (~in_exact & (flat < sh_end.view(c, 1))).reshape(lsh_idx.shape)
        pairs = pairs + span * row_ok.sum()

    # 4. Residual samples of C_j by systematic sampling of a proposal pi: stratum s of the
    #    cumulative proposal [s/m, (s+1)/m) gives one draw, so column c is drawn m pi(c) times
    #    in expectation and weight 1 / (m pi(c)) makes the estimate unbiased (Hansen-Hurwitz).
    #    pi mixes uniform over C_j (weight sample_mix, which bounds every weight by
    #    |C_j| / (m sample_mix)) with the block scores, each key block's share spread evenly
    #    over its keys in C_j. It is constant inside a key block, so a draw picks the key
    #    block from the cumulative proposal over key blocks and the key inside it from the
    #    draw's remaining fraction. When m >= |C_j| every column is taken once with weight 1
    #    instead: exact.
    m = budget.sample_size
    mix = budget.sample_mix
    # In float64: the draws compare u with cumulative sums, and a GPU cumsum's rounding depends
    # on the tensor's shape; float64 keeps a chunk's draws those of the whole call.
    open_d = open_c.double()
    guide = score.double() * (open_d > 0)
    guide_total = guide.sum(-1, keepdim=True)
    uniform = open_d / comp_count.unsqueeze(-1).clamp(min=1)
    guided = torch.where(guide_total > 0, guide / guide_total.clamp(min=1e-300), uniform)
    proposal = mix * uniform + (1.0 - mix) * guided  # (B, Hq, c, nkb), per key block
    cdf = proposal.cumsum(-1)
    u = (torch.arange(m, device=device) + draws.samples[:, :, blocks].double()) / max(m, 1)
    u = u * cdf[..., -1:]
    kb_idx = torch.searchsorted(cdf, u, right=True)
    last = torch.where(proposal > 0, torch.arange(nkb, device=device), 0).amax(-1, keepdim=True)
    kb_idx = torch.minimum(kb_idx, last)
    p_block = proposal.gather(-1, kb_idx)
    before = torch.where(kb_idx > 0, cdf.gather(-1, (kb_idx - 1).clamp(min=0)), 0.0)
    n_open = open_d.gather(-1, kb_idx)
    inside = torch.floor((u - before) / p_block.clamp(min=1e-300) * n_open)
    inside = torch.minimum(inside.clamp(min=0), (n_open - 1).clamp(min=0)).long()
    rank = (open_d.cumsum(-1) - open_d).gather(-1, kb_idx).long() + inside
    drawn = _nth_missing(exact_idx, rank)
    drawn_logw = -torch.log(m * p_block / n_open.clamp(min=1))
    every_rank = torch.arange(m, device=device).expand_as(rank).contiguous()
    every = _nth_missing(exact_idx, every_rank)
    full = (comp_count <= m).unsqueeze(-1)
    sample_idx = torch.where(full, every, drawn)
    sample_valid = torch.where(full, every_rank < comp_count.unsqueeze(-1), (p_block > 0) & (n_open > 0))
    sample_logw = torch.where(full, 0.0, drawn_logw).float().masked_fill(~sample_valid, _NEG_INF)
    sample_idx = sample_idx.masked_fill(~sample_valid, 0)
    pairs = pairs + sample_valid.sum() * qb / (bsz * hq)
    return Selection(blocks, exact_idx, sample_idx, sample_logw, lsh_idx, lsh_ok, first, k_order), pairs


def attend_blocks(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, r0: int, query_block: int,
                  sel: Selection, ctx: dict | None = None) -> tuple[Tensor, Tensor]:
    """Step 5 for the blocks of ``sel``: ``out (B, Hq, c, qb, D)`` and ``lse (B, Hq, c, qb)`` fp32.

    Each row attends the exact set (keys it sees), the residual samples (log-weights added;
    a sample in the row's own LSH block is masked, it counts there) and its LSH block, in one
    softmax: the three parts merged through their log-sum-exp.

    This is the protocol :func:`structured_attention` calls for every chunk of query blocks,
    with a ``ctx`` dict that lives for one call; an implementation may defer work to a
    ``finish(q, k, v, scale, r0, query_block, blocks, out, lse, ctx)`` attribute, called once
    on the concatenated results (the kernels run every row's LSH block in one pass there),
    and set ``chunk_elements`` and ``rows_times_keys`` to size the chunks (:func:`block_chunk`).
    """
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    qb = query_block
    rows = r0 + qb * sel.blocks.unsqueeze(-1) + torch.arange(qb, device=q.device)  # (c, qb)
    q_rows = q[:, :, rows.clamp(max=nq - 1)]
    row_limit = rows + (nk - nq) if causal else torch.full_like(rows, nk - 1)

    idx = sel.exact_idx
    ke, ve = _gather_kv(k, idx.clamp(max=nk - 1)), _gather_kv(v, idx.clamp(max=nk - 1))  # (B, Hq, c, S, D)
    s = (q_rows @ ke.transpose(-1, -2)) * scale
    o, l = softmax_lse(s.masked_fill(~(idx.unsqueeze(-2) <= row_limit.unsqueeze(-1)), _NEG_INF), ve)

    idx = sel.sample_idx
    ks, vs = _gather_kv(k, idx), _gather_kv(v, idx)
    s = (q_rows @ ks.transpose(-1, -2)) * scale + sel.sample_logw.unsqueeze(-2)
    if sel.lsh_idx is None:
        return merge_lse(o, l, *softmax_lse(s, vs))
    li, lok = sel.lsh_idx, sel.lsh_ok  # (B, Hq, c, qb, L)
    li_sorted = torch.sort(li.masked_fill(~lok, -1), dim=-1).values
    drawn_keys = idx.unsqueeze(-2).expand(-1, -1, -1, qb, -1).contiguous()
    hit = torch.searchsorted(li_sorted, drawn_keys).clamp(max=li.shape[-1] - 1)
    s = s.masked_fill(li_sorted.gather(-1, hit) == drawn_keys, _NEG_INF)
    o, l = merge_lse(o, l, *softmax_lse(s, vs))
    kl, vl = _gather_kv(k, li), _gather_kv(v, li)  # (B, Hq, c, qb, L, D)
    s = (q_rows.unsqueeze(-2) @ kl.transpose(-1, -2)).squeeze(-2) * scale
    o_l, l_l = softmax_lse(s.masked_fill(~lok, _NEG_INF).unsqueeze(-2), vl)
    return merge_lse(o, l, o_l.squeeze(-2), l_l.squeeze(-1))


def block_chunk(hq: int, nk: int, budget: Budget, elements: int = _CHUNK_ELEMENTS, rows_times_keys: bool = True
                ) -> int:
    """Query blocks per chunk of :func:`structured_attention`: the largest tensor stays near ``elements``.

    ``rows_times_keys``: the attention step materialises (row, selected key) scores, as
    :func:`attend_blocks` does (a kernel does not).
    """
    qb = budget.query_block
    per_row = budget.lsh_block + 8
    if rows_times_keys:
        per_row = (budget.num_sinks + qb + budget.window + budget.heavy_columns + budget.key_blocks * budget.key_block
                   + budget.sample_size + budget.lsh_block)
    per_block = hq * max(qb * per_row, qb // budget.score_group * math.ceil(nk / budget.key_block))
    return max(1, elements // per_block)


def structured_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, budget: Budget,
                         draws: StructuredDraws, r0: int, blocks: Tensor | None = None, heavy: Tensor | None = None,
                         count_all: bool = False, attend=attend_blocks, k_pool: Tensor | None = None,
                         lsh_sorted: tuple[Tensor, Tensor] | None = None, q_bucket: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, float]:
    """The approximate rows ``[r0, Nq)`` of the structured method for fixed draws (no guard, no probe rows).

    ``q: (B, Hq, Nq, D)``, ``k, v: (B, Hkv, Nk, D)`` fp32. Rows are cut into query blocks
    of ``budget.query_block`` starting at ``r0``; ``blocks`` (default all) names the query
    blocks whose attention is computed. ``heavy``, ``k_pool``, ``lsh_sorted`` and
    ``q_bucket`` (default: computed here) come from :func:`heavy_columns`, :func:`pool_keys`,
    :func:`sort_keys_by_bucket` and :func:`~hyperattn.reference.lsh.lsh_buckets`; ``attend``
    computes step 5 (:func:`attend_blocks`, or a kernel, which may also bring its own
    ``block_scores``).

    Returns ``out (B, Hq, nsel, query_block, D)``, ``lse (B, Hq, nsel, query_block)`` fp32
    (rows past ``Nq`` in the last block are padding) and the (query, key) scores per head:
    of the computed blocks, or of the full call with ``count_all`` (the heavy-column
    search is counted only when it runs here).
    """
    nq, nk = q.shape[2], k.shape[2]
    qb = budget.query_block
    num_blocks = math.ceil((nq - r0) / qb)
    all_blocks = torch.arange(num_blocks)
    blocks = all_blocks if blocks is None else blocks.cpu().long()
    pairs = 0.0
    if heavy is None:
        heavy, pairs = heavy_columns(q, k, scale, causal, budget, draws, r0)
    if k_pool is None:
        k_pool = pool_keys(k.float(), budget.key_block)
    lsh_keys = None
    if budget.lsh_block > 0 and nk > 0:
        sorted_comp, k_order = sort_keys_by_bucket(k, draws.proj) if lsh_sorted is None else lsh_sorted
        lsh_keys = (sorted_comp.repeat_interleave(q.shape[1] // k.shape[1], dim=1), k_order)
        if q_bucket is None:
            q_bucket = lsh_buckets(q, draws.proj)
    score_fn = getattr(attend, "block_scores", None)
    step = block_chunk(q.shape[1], nk, budget, getattr(attend, "chunk_elements", _CHUNK_ELEMENTS),
                       getattr(attend, "rows_times_keys", True))
    outs, lses, ctx = [], [], {}
    for c0 in range(0, len(blocks), step):
        sel, p = select_blocks(q, k, scale, causal, budget, draws, r0, blocks[c0:c0 + step], heavy, k_pool, lsh_keys,
                               q_bucket, score_fn)
        pairs = pairs + p
        o, l = attend(q, k, v, scale, causal, r0, qb, sel, ctx)
        outs.append(o)
        lses.append(l)
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    finish = getattr(attend, "finish", None)
    if finish is not None:
        out, lse = finish(q, k, v, scale, r0, qb, blocks, out, lse, ctx)
    if count_all:
        rest = all_blocks[~torch.isin(all_blocks, blocks)]
        for c0 in range(0, len(rest), step):
            pairs = pairs + select_blocks(q, k, scale, causal, budget, draws, r0, rest[c0:c0 + step], heavy, k_pool,
                                          lsh_keys, q_bucket, score_fn)[1]
    return out, lse, float(pairs)


def first_approx_row(nq: int, nk: int, causal: bool, min_seq_len: int) -> int:
    """First query row that sees more than ``min_seq_len`` keys (``Nq`` if none does)."""
    if not causal:
        return 0 if nk > min_seq_len else nq
    # Row i sees i + 1 + (Nk - Nq) keys.
    return min(nq, max(0, min_seq_len - (nk - nq)))


# Budget tiers the guard tries, cheapest first, as multiples of the key blocks and samples
# of the base budget, before exact. A trial costs ~1% of its tier's full pass. Finer
# steps (sqrt(2)) stop heads closer to their need but give a noisy estimate more chances
# to pass by luck: measured, the guard then missed its 1.5x max_error bound on > 5% of
# heads (docs/QUALITY.md).
_TIERS = (0.25, 0.5, 1, 2, 4, 8)


def _probe_error(out_approx: Tensor, out_exact: Tensor) -> Tensor:
    """``||O_approx - O_exact||_F / ||O_exact||_F`` over the probe rows, per (batch, head)."""
    num = (out_approx - out_exact).pow(2).sum((-1, -2))
    den = out_exact.pow(2).sum((-1, -2)).clamp(min=torch.finfo(torch.float32).tiny)
    return (num / den).sqrt()


# Probe rows lie in this many random query blocks (8 rows per block at the default 64),
# so a caller that computes only some blocks (the evaluation) can still compute them.
_PROBE_BLOCKS = 8


@dataclass(frozen=True)
class _Shared:
    """What every guard tier of one call shares: heavy columns, pooled keys, the bucket sort, exact probe rows.

    Per-head tensors are ``(B, Hq, ...)``, per-KV-head ones ``(B, Hkv, ...)``;
    :meth:`pick` gives them for a subset of heads, each its own KV head (as
    :func:`_select_heads` lays out K and V).
    """

    heavy: Tensor
    k_pool: Tensor
    lsh_sorted: tuple[Tensor, Tensor] | None
    q_bucket: Tensor | None  # (B, Hq, Nq) every row's LSH bucket
    probe: Tensor  # (B, Hq, P) probe-row positions
    probe_out: Tensor  # (B, Hq, P, D) their exact output
    probe_lse: Tensor  # (B, Hq, P)
    probe_pairs: float  # scores per head of the probe rows

    def pick(self, heads: Tensor, group: int) -> _Shared:
        b, h = heads[:, 0], heads[:, 1]

        def per_head(x):
            return x[b, h].unsqueeze(0)

        def per_kv(x):
            return x[b, h // group].unsqueeze(0)

        lsh = None if self.lsh_sorted is None else tuple(per_kv(x) for x in self.lsh_sorted)
        q_bucket = None if self.q_bucket is None else per_head(self.q_bucket)
        return _Shared(per_head(self.heavy), per_kv(self.k_pool), lsh, q_bucket, per_head(self.probe),
                       per_head(self.probe_out), per_head(self.probe_lse), self.probe_pairs)


def _shared_parts(q, k, v, scale, causal, budget, seed, r0) -> tuple[_Shared, float]:
    """The :class:`_Shared` parts of a call and the scores per head of the heavy-column search."""
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    qb = budget.query_block
    num_blocks = math.ceil((nq - r0) / qb)
    draws = draw_structured(seed, dim, bsz, hq, num_blocks, dataclasses.replace(budget, sample_size=0), q.device)
    heavy, heavy_pairs = heavy_columns(q, k, scale, causal, budget, draws, r0)
    lsh = q_bucket = None
    if budget.lsh_block > 0 and nk > 0:
        lsh, q_bucket = sort_keys_by_bucket(k, draws.proj), lsh_buckets(q, draws.proj)
    # Probe row p lies in probe block p % _PROBE_BLOCKS, at a random offset inside it.
    probe_blocks = (draws.probe_blocks * num_blocks).long().clamp(max=num_blocks - 1)
    pb = probe_blocks[torch.arange(budget.probe_rows) % _PROBE_BLOCKS]
    pb_start = r0 + pb * qb
    pb_len = torch.clamp(nq - pb_start, max=qb)
    probe = (pb_start + torch.minimum((draws.probe * pb_len).long(), pb_len - 1)).to(q.device)  # (B, Hq, P)
    out_e, lse_e, seen = _rows_attention(q, probe, k, v, scale, causal)
    probe_pairs = float(seen.sum()) / (bsz * hq)
    return (_Shared(heavy, pool_keys(k.float(), budget.key_block), lsh, q_bucket, probe, out_e, lse_e, probe_pairs),
            heavy_pairs)


def _approx_rows(q, k, v, scale, causal, budget, seed, r0, eval_blocks=None, heads=None, num_heads=None,
                 shared=None, trial=False, attend=attend_blocks):
    """Approximate rows from ``r0`` on, probe rows exact, and the per-head probe estimate.

    ``heads: (S, 2)`` (with ``num_heads = (B, Hq)`` of the whole call) names the (batch,
    head) pairs that ``q: (1, S, Nq, D)`` holds: each head gets the draws it has in the
    whole call, so a head's result does not depend on which other heads are computed.
    ``shared`` holds the heads' :class:`_Shared` parts (default: computed here).

    Returns ``out (B, Hq, R, D)``, ``lse (B, Hq, R)``, ``rows (R,)`` (the rows computed:
    all of ``[r0, Nq)``, or those of ``eval_blocks`` and the probe blocks), ``est (B, Hq)``
    and the scores per head of the full call (probe rows included). With ``trial`` only
    the probe blocks are computed and the last value is their scores per row instead.
    """
    bsz, hq, nq, dim = q.shape
    qb = budget.query_block
    num_blocks = math.ceil((nq - r0) / qb)
    if shared is None:
        shared, _ = _shared_parts(q, k, v, scale, causal, budget, seed, r0)
    if heads is None:
        draws = draw_structured(seed, dim, bsz, hq, num_blocks, budget, q.device)
    else:
        draws = _head_draws(draw_structured(seed, dim, *num_heads, num_blocks, budget, q.device), heads.cpu())
    probe_blocks = (draws.probe_blocks * num_blocks).long().clamp(max=num_blocks - 1)
    if eval_blocks is None and not trial:
        blocks = torch.arange(num_blocks)
    else:
        extra = torch.zeros(0, dtype=torch.long) if eval_blocks is None else eval_blocks.cpu().long()
        blocks = torch.unique(torch.cat([extra, probe_blocks]))
    out, lse, pairs = structured_attention(q, k, v, scale, causal, budget, draws, r0, blocks, shared.heavy,
                                           count_all=not trial, attend=attend, k_pool=shared.k_pool,
                                           lsh_sorted=shared.lsh_sorted, q_bucket=shared.q_bucket)
    rows = (r0 + blocks.unsqueeze(-1) * qb + torch.arange(qb)).reshape(-1).to(q.device)
    keep = rows < nq
    out = out.reshape(bsz, hq, -1, out.shape[-1])[:, :, keep]
    lse = lse.reshape(bsz, hq, -1)[:, :, keep]
    rows = rows[keep]
    if trial:
        pairs /= len(rows)
    else:
        pairs += shared.probe_pairs
    local = torch.searchsorted(rows, shared.probe).unsqueeze(-1)  # position of each probe row among `rows`
    est = _probe_error(out.gather(2, local.expand(-1, -1, -1, out.shape[-1])), shared.probe_out)
    # Probe rows were computed exactly anyway: their output is the exact one.
    out = out.scatter(2, local.expand(-1, -1, -1, out.shape[-1]), shared.probe_out)
    lse = lse.scatter(2, local.squeeze(-1), shared.probe_lse)
    return out, lse, rows, est, pairs


def _head_draws(draws: StructuredDraws, heads: Tensor) -> StructuredDraws:
    """The per-head draws of ``heads: (S, 2)`` (batch, head) pairs, as a batch of 1 with ``S`` heads."""
    def pick(x):
        return x[heads[:, 0], heads[:, 1]].unsqueeze(0)
    return dataclasses.replace(draws, probe=pick(draws.probe), block_probe=pick(draws.block_probe),
                               samples=pick(draws.samples))


def _select_heads(x: Tensor, heads: Tensor, group: int) -> Tensor:
    """``x[b, h // group]`` for each selected ``(b, h)`` row of ``heads: (S, 2)``, as ``(1, S, N, D)``."""
    return x[heads[:, 0], heads[:, 1] // group].unsqueeze(0)


def run(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, config, seed: int):
    """Runner of ``method="structured"`` for :func:`hyperattn.hyper_attention` (inputs already validated).

    Returns ``out (B, Hq, Nq, D)`` fp32, ``lse (B, Hq, Nq)`` fp32 and
    :class:`~hyperattn.ops.AttentionStats` (``est_error`` from the probe rows, after the
    guard: 0 for exact heads; ``exact_heads`` the heads the guard computed exactly).
    """
    from ..ops import AttentionStats

    out, lse, stats, _ = structured_run(q, k, v, scale, causal, budget_from_config(config), seed,
                                        config.max_error, AttentionStats)
    return out, lse, stats


def _guarded_rows(qf, kf, vf, scale, causal, budget, seed, r0, eval_blocks, max_error, group, pairs, exact_heads,
                  shared, attend=attend_blocks, exact=attention_lse):
    """Rows from ``r0`` on with the guard; adds each head's scores to ``pairs`` and marks ``exact_heads``.

    The tiers of :data:`_TIERS` are tried cheapest first on the probe rows only (about 1%
    of a full pass each); each head then runs once, at the first tier whose estimate meets
    ``max_error`` and that scores fewer keys than exact attention, or exactly. A head has
    the same draws in its trial and in its final run, so its probe blocks, its output
    there and its estimate are those the guard decided on. ``shared`` (:class:`_Shared`)
    is what every tier shares; ``attend`` and ``exact`` compute the approximate and the
    exact rows (PyTorch here, kernels on the GPU).
    """
    bsz, hq, nq, _ = qf.shape
    exact_cost = _exact_row_pairs(r0, nq, nq, kf.shape[2], causal)
    all_heads = torch.cartesian_prod(torch.arange(bsz), torch.arange(hq)).to(qf.device)  # (B*Hq, 2)
    hc = all_heads.cpu()
    level = torch.full((len(all_heads),), len(_TIERS), dtype=torch.long)
    pending = torch.ones(len(all_heads), dtype=torch.bool)

    def subset(idx):
        heads = all_heads[idx.to(qf.device)]
        q_sel = qf[heads[:, 0], heads[:, 1]].unsqueeze(0)
        return (heads, q_sel, _select_heads(kf, heads, group), _select_heads(vf, heads, group),
                shared.pick(heads, group))

    for i, factor in enumerate(_TIERS):
        idx = torch.nonzero(pending).squeeze(-1)
        if len(idx) == 0:
            break
        heads, q_sel, k_sel, v_sel, h_sel = subset(idx)
        _, _, _, est_i, per_row = _approx_rows(q_sel, k_sel, v_sel, scale, causal, budget.scaled(factor), seed,
                                               r0, None, heads, (bsz, hq), h_sel, trial=True, attend=attend)
        # A trial needs the approximate output of the probe rows only (their blocks' selection
        # is that of the full call): it is charged what those rows score, at the mean per row of
        # their blocks.
        pairs[hc[idx, 0], hc[idx, 1]] += per_row * min(budget.probe_rows, nq - r0)
        if per_row * (nq - r0) >= exact_cost:  # this and every larger tier cost about as much as exact
            break
        ok = est_i[0].cpu() <= max_error
        level[idx[ok]] = i
        pending[idx[ok]] = False

    out = lse = rows = None
    est = torch.zeros(bsz, hq, device=qf.device)
    for i, factor in enumerate(_TIERS):
        idx = torch.nonzero(level == i).squeeze(-1)
        if len(idx) == 0:
            continue
        if len(idx) == len(all_heads):  # every head at one tier: no per-head copies
            o, l, rows, e, p = _approx_rows(qf, kf, vf, scale, causal, budget.scaled(factor), seed, r0, eval_blocks,
                                            shared=shared, attend=attend)
            pairs += p
            return o, l, rows, e
        heads, q_sel, k_sel, v_sel, h_sel = subset(idx)
        o, l, rows, e, p = _approx_rows(q_sel, k_sel, v_sel, scale, causal, budget.scaled(factor), seed, r0,
                                        eval_blocks, heads, (bsz, hq), h_sel, attend=attend)
        if out is None:
            out = qf.new_zeros(bsz, hq, len(rows), vf.shape[-1], dtype=torch.float32)
            lse = qf.new_zeros(bsz, hq, len(rows), dtype=torch.float32)
        out = out.index_put((heads[:, 0], heads[:, 1]), o[0])
        lse = lse.index_put((heads[:, 0], heads[:, 1]), l[0])
        est = est.index_put((heads[:, 0], heads[:, 1]), e[0])
        pairs[hc[idx, 0], hc[idx, 1]] += p
    idx = torch.nonzero(level == len(_TIERS)).squeeze(-1)
    if len(idx) > 0:
        heads, q_sel, k_sel, v_sel, _ = subset(idx)
        o, l = exact(q_sel, k_sel, v_sel, scale, causal)
        if rows is None:
            rows = _computed_rows(nq, r0, budget, seed, qf.shape[-1], bsz, hq, eval_blocks).to(qf.device)
            out = qf.new_zeros(bsz, hq, len(rows), vf.shape[-1], dtype=torch.float32)
            lse = qf.new_zeros(bsz, hq, len(rows), dtype=torch.float32)
        out = out.index_put((heads[:, 0], heads[:, 1]), o[0][:, rows])
        lse = lse.index_put((heads[:, 0], heads[:, 1]), l[0][:, rows])
        pairs[hc[idx, 0], hc[idx, 1]] += exact_cost
        exact_heads[heads[:, 0], heads[:, 1]] = True
    return out, lse, rows, est


def _computed_rows(nq, r0, budget, seed, dim, bsz, hq, eval_blocks) -> Tensor:
    """The rows :func:`_approx_rows` returns: all of ``[r0, Nq)``, or those of ``eval_blocks`` and the probe blocks."""
    qb = budget.query_block
    num_blocks = math.ceil((nq - r0) / qb)
    if eval_blocks is None:
        return torch.arange(r0, nq)
    draws = draw_structured(seed, dim, bsz, hq, num_blocks, dataclasses.replace(budget, sample_size=0))
    probe_blocks = (draws.probe_blocks * num_blocks).long().clamp(max=num_blocks - 1)
    blocks = torch.unique(torch.cat([eval_blocks.cpu().long(), probe_blocks]))
    rows = (r0 + blocks.unsqueeze(-1) * qb + torch.arange(qb)).reshape(-1)
    return rows[rows < nq]


def structured_run(q, k, v, scale, causal, budget: Budget, seed: int, max_error: float | None, stats_type,
                   eval_blocks: Tensor | None = None, attend=attend_blocks, exact=attention_lse):
    """:func:`run` with an explicit :class:`Budget`; returns ``(out, lse, stats, rows)``.

    ``eval_blocks=None`` computes every row (``rows`` is ``arange(Nq)``). The evaluation
    passes query-block indices to compute only those blocks (and the probe blocks): the
    rows it gets back are identical to the full call's and ``stats`` is the full call's,
    but rows exact by construction (before ``min_seq_len``) are skipped. ``attend`` and
    ``exact`` compute approximate and exact rows (:func:`attend_blocks` and
    :func:`~hyperattn.reference.exact.attention_lse`, or the GPU kernels).
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    # No complement has more than Nk columns, and m >= |C_j| already means "all of them":
    # a larger m would only draw unused uniforms.
    budget = dataclasses.replace(budget, sample_size=min(budget.sample_size, nk))
    group = hq // hkv
    # The kernels take the inputs as they are; the PyTorch path computes in fp32.
    qf, kf, vf = (q, k, v) if attend is not attend_blocks else (q.float(), k.float(), v.float())
    offset = nk - nq
    r0 = first_approx_row(nq, nk, causal, budget.min_seq_len)
    pairs = torch.zeros(bsz, hq, dtype=torch.float64)
    outs, lses = [], []
    if r0 > 0:
        k_end = max(r0 + offset, 0) if causal else nk
        pairs += _exact_row_pairs(0, r0, nq, nk, causal)
        if eval_blocks is None:
            o, l = exact(qf[:, :, :r0], kf[:, :, :k_end], vf[:, :, :k_end], scale, causal)
            outs.append(o)
            lses.append(l)
    zeros = torch.zeros(bsz, hq, device=q.device)
    exact_heads = torch.zeros(bsz, hq, dtype=torch.bool, device=q.device)
    if r0 == nq:
        stats = stats_type("structured", float(pairs.mean()) / nq, zeros, ~exact_heads)
        return outs[0], lses[0], stats, torch.arange(nq, device=q.device)

    # Heavy columns, pooled keys, the bucket sort and the exact probe rows do not depend on
    # the budget tier: computed once.
    shared, heavy_pairs = _shared_parts(qf, kf, vf, scale, causal, budget, seed, r0)
    pairs += heavy_pairs
    if max_error is None:
        out, lse, rows, est, approx_pairs = _approx_rows(qf, kf, vf, scale, causal, budget, seed, r0, eval_blocks,
                                                         shared=shared, attend=attend)
        pairs += approx_pairs
    else:
        out, lse, rows, est = _guarded_rows(qf, kf, vf, scale, causal, budget, seed, r0, eval_blocks, max_error,
                                            group, pairs, exact_heads, shared, attend, exact)
    stats = stats_type("structured", float(pairs.mean()) / nq, est, exact_heads)
    if eval_blocks is not None:
        return out, lse, stats, rows
    outs.append(out)
    lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), stats, torch.arange(nq, device=q.device)


def _exact_row_pairs(r0: int, r1: int, nq: int, nk: int, causal: bool) -> float:
    """Scores exact attention computes for rows ``[r0, r1)`` of one head."""
    if not causal:
        return float((r1 - r0) * nk)
    offset = nk - nq
    return float(sum(max(0, min(nk, i + 1 + offset)) for i in range(r0, r1)))
