"""Structured HyperAttention with an error guard (``method="structured"``), written for reading.

Real LLM heads put most of their mass on a few sink/delimiter columns, on the local
diagonal and on a few far blocks that neighbouring queries share; the paper's small-α
assumption fails there (DESIGN.md §3). This method scores those parts exactly and
*estimates* the rest without dropping it.

Queries are processed in blocks of ``query_block`` consecutive rows (64). For query
block ``j`` and head ``h`` (shape legend of :mod:`hyperattn.ops`):

1. **Block probe.** ``block_probes`` random rows of the block are scored against every
   key they see; their softmax weights pick the heavy columns and guide the residual
   samples. The key blocks are ranked by block scores: the mean query of each
   ``score_group`` (8) consecutive rows scores the mean key of every key block it sees,
   and the softmax weights over key blocks are summed over the query block
   (MInference/XAttention-style pooling).
2. **Exact set** ``E_j``: the first ``num_sinks`` keys; a local window of ``window`` keys
   before the block plus the block's own diagonal; the ``heavy_columns`` columns with the
   largest mass over the probe rows (vertical lines shared by the head); and the
   ``key_blocks`` key blocks of ``key_block`` (64) keys with the largest block score not
   yet covered.
3. **LSH block** ``L_i`` per query: keys are sorted by (Gray-code bucket, position); query
   ``i`` takes the ``lsh_block`` most recent keys of its own bucket (and the neighbouring
   bucket) that lie before the window and outside ``E_j``. This finds a needle key that
   only this query matches, which the block probe can miss.
4. **Residual.** The complement ``C_j`` (keys every query of the block sees, outside
   ``E_j``) is cut into ``sample_size`` near-equal strata of its rank order, one column is
   drawn per stratum and weighted by the stratum size (Horvitz-Thompson: every column of
   ``C_j`` has inclusion probability 1/|stratum|). A sampled column that is in the
   query's own ``L_i`` is masked (already counted exactly), so the estimate of
   ``sum_{c in C_j minus L_i} exp(s_ic)`` stays unbiased. With ``sample_size >= |C_j|``
   every column is taken once with weight 1 and the result is exact.
5. The three parts merge through their log-sum-exp (:func:`~hyperattn.reference.exact.merge_lse`).

Rows that see at most ``min_seq_len`` keys (1024 by default) are exact, and so are the
probe rows and block-probe rows, whose exact outputs are computed anyway.

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

Randomness comes from a CPU ``torch.Generator`` seeded with ``seed`` (:func:`draw_structured`),
so a kernel can reproduce the same draws.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .exact import attention_lse, merge_lse, softmax_lse
from .lsh import draw_projections, lsh_buckets

__all__ = ["Budget", "StructuredDraws", "budget_from_config", "draw_structured", "structured_attention",
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
    sample_mix: float = 0.5
    block_scores: str = "pooled"
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


def draw_structured(seed: int, head_dim: int, batch: int, heads: int, num_blocks: int, budget: Budget
                    ) -> StructuredDraws:
    """Every random number of one call, from a CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    proj = draw_projections(head_dim, budget.lsh_num_projs, gen)
    probe_blocks = torch.rand(_PROBE_BLOCKS, generator=gen)
    probe = torch.rand(batch, heads, budget.probe_rows, generator=gen)
    block_probe = torch.rand(batch, heads, num_blocks, budget.block_probes, generator=gen)
    samples = torch.rand(batch, heads, num_blocks, budget.sample_size, generator=gen)
    return StructuredDraws(proj=proj, probe_blocks=probe_blocks, probe=probe, block_probe=block_probe, samples=samples)


def _gather_kv(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of ``x: (B, Hkv, Nk, D)`` at ``idx: (B, Hq, ...)`` -> ``(B, Hq, ..., D)``, without repeating K/V per head."""
    bsz, hkv, _, dim = x.shape
    hq = idx.shape[1]
    flat = idx.reshape(bsz, hkv, -1)
    out = x.gather(2, flat.unsqueeze(-1).expand(*flat.shape, dim))
    return out.reshape(bsz, hq, *idx.shape[2:], dim)


def _rows_attention(q_rows: Tensor, limit: Tensor, k: Tensor, v: Tensor, scale: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Exact attention of chosen rows ``q_rows: (B, Hq, R, D)``; row ``r`` sees keys ``< limit[..., r]``.

    Returns ``out (B, Hq, R, D)``, ``lse (B, Hq, R)`` and the softmax weights ``(B, Hq, R, Nk)``.
    """
    bsz, hq, rows, dim = q_rows.shape
    hkv, nk = k.shape[1], k.shape[2]
    qg = q_rows.reshape(bsz, hkv, hq // hkv * rows, dim)
    scores = (qg @ k.transpose(-1, -2)).reshape(bsz, hq, rows, nk) * scale
    scores = scores.masked_fill(torch.arange(nk, device=k.device) >= limit.unsqueeze(-1), _NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = (probs.reshape(bsz, hkv, -1, nk) @ v).reshape(bsz, hq, rows, v.shape[-1])
    return out, lse, probs


def _mass_topk(mass: Tensor, count: int) -> Tensor:
    """Boolean mask ``(..., n)`` of the ``count`` largest entries of ``mass`` that are > 0."""
    keep = torch.zeros_like(mass, dtype=torch.bool)
    count = min(count, mass.shape[-1])
    if count == 0:
        return keep
    values, index = torch.topk(mass, count, dim=-1)
    return keep.scatter(-1, index, values > 0)


def structured_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, budget: Budget,
                         draws: StructuredDraws, r0: int, blocks: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, float]:
    """The approximate rows ``[r0, Nq)`` of the structured method for fixed draws (no guard, no probe rows).

    ``q: (B, Hq, Nq, D)``, ``k, v: (B, Hkv, Nk, D)`` fp32. Rows are cut into query blocks
    of ``budget.query_block`` starting at ``r0``; ``blocks`` (default all) names the query
    blocks whose attention is computed (the selection always looks at every block, so a
    block's result does not depend on which others are computed).

    Returns ``out (B, Hq, nsel, query_block, D)``, ``lse (B, Hq, nsel, query_block)`` fp32
    (rows past ``Nq`` in the last block are padding) and the number of (query, key) scores
    the full call computes per head.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    device = q.device
    offset = nk - nq
    qb = budget.query_block
    num_blocks = math.ceil((nq - r0) / qb)
    block_start = r0 + qb * torch.arange(num_blocks, device=device)  # (nb,) first row of each block
    block_end = torch.clamp(block_start + qb, max=nq)
    keys = torch.arange(nk, device=device)
    pairs = 0.0

    # Keys a row sees: all of them, or (causal) keys <= row + offset.
    if causal:
        visible_end = block_end + offset  # keys < this are seen by the block's last row
        shared_end = block_start + offset + 1  # keys < this are seen by every row of the block
    else:
        visible_end = torch.full_like(block_start, nk)
        shared_end = visible_end

    kb = budget.key_block
    num_key_blocks = math.ceil(nk / kb)
    pad = num_key_blocks * kb - nk

    # 1. Block probe rows, scored exactly: per-key weights for the heavy columns and the proposal.
    block_mass = None
    if budget.block_probes > 0:
        block_len = block_end - block_start
        probe_rows = block_start.unsqueeze(-1) + (draws.block_probe.to(device) * block_len.unsqueeze(-1)).long()
        probe_rows = torch.minimum(probe_rows, (block_end - 1).unsqueeze(-1))  # (B, Hq, nb, R)
        rows_flat = probe_rows.reshape(bsz, hq, -1)
        q_rows = q.gather(2, rows_flat.unsqueeze(-1).expand(*rows_flat.shape, dim))
        limit = rows_flat + offset + 1 if causal else torch.full_like(rows_flat, nk)
        _, _, block_probs = _rows_attention(q_rows, limit, k, v, scale)
        pairs += float(limit.clamp(max=nk).sum()) / (bsz * hq)
        block_mass = block_probs.reshape(bsz, hq, num_blocks, -1, nk).sum(3)  # (B, Hq, nb, Nk)

    # 1b. Block scores: the mean query of every score_group rows scores the mean key of each key
    #     block it sees; the softmax weights over key blocks, summed over the query block, rank
    #     the key blocks (pooling 8 rows changed no layer's error by more than 0.004).
    if budget.block_scores == "pooled":
        g = budget.score_group
        k_pad = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(bsz, hkv, num_key_blocks, kb, dim)
        counts = torch.clamp(nk - kb * torch.arange(num_key_blocks, device=device), max=kb)
        k_pool = k_pad.sum(3) / counts.unsqueeze(-1)
        q_blk = torch.nn.functional.pad(q[:, :, r0:], (0, 0, 0, num_blocks * qb - (nq - r0)))
        q_blk = q_blk.reshape(bsz, hq, num_blocks, qb // g, g, dim).mean(4)
        pooled = (q_blk.reshape(bsz, hkv, -1, dim) @ k_pool.transpose(-1, -2)) * scale
        pooled = pooled.reshape(bsz, hq, num_blocks, qb // g, num_key_blocks)
        row_pos = block_start.unsqueeze(-1) + g * torch.arange(qb // g, device=device) + g - 1  # (nb, qb/g)
        row_last = row_pos + offset if causal else torch.full_like(row_pos, nk - 1)
        seen_blocks = kb * torch.arange(num_key_blocks, device=device) <= row_last.unsqueeze(-1)
        seen_blocks = seen_blocks & (row_pos - g + 1 < nq).unsqueeze(-1)  # (nb, qb/g, nkb)
        pooled = torch.softmax(pooled.masked_fill(~seen_blocks, _NEG_INF), dim=-1).nan_to_num(0.0)
        pairs += float(seen_blocks.sum())
        key_block_score = pooled.sum(3)  # (B, Hq, nb, nkb)
    else:
        key_block_score = torch.nn.functional.pad(block_mass, (0, pad)).reshape(
            bsz, hq, num_blocks, num_key_blocks, kb).sum(-1)

    # 2. Exact set E_j as a boolean mask over keys: sinks, window + diagonal, heavy columns, top key blocks.
    in_window = (keys >= (shared_end - 1 - budget.window).unsqueeze(-1)) & (keys < visible_end.unsqueeze(-1))
    if not causal:
        centre = torch.clamp(block_start + offset, 0, nk)
        in_window = ((keys >= (centre - budget.window // 2).unsqueeze(-1))
                     & (keys < (centre + qb + budget.window // 2).unsqueeze(-1)))
    exact = (keys < budget.num_sinks) | in_window  # (nb, Nk)
    exact = exact.expand(bsz, hq, num_blocks, nk)
    if block_mass is not None:
        column_mass = block_mass.sum(2).masked_fill(keys < budget.num_sinks, 0.0)
        exact = exact | _mass_topk(column_mass, budget.heavy_columns).unsqueeze(2)
    visible = keys < visible_end.unsqueeze(-1)  # (nb, Nk)
    exact = exact & visible
    # A key block's score counts only its keys not yet in the set.
    open_keys = torch.nn.functional.pad(visible & ~exact, (0, pad)).reshape(bsz, hq, num_blocks, num_key_blocks, kb)
    chosen = _mass_topk(key_block_score * open_keys.float().mean(-1), budget.key_blocks)
    exact = exact | (chosen.repeat_interleave(kb, dim=-1)[..., :nk] & visible)
    complement = (keys < shared_end.unsqueeze(-1)) & ~exact  # C_j, seen by every row of the block

    # E_j as padded index lists, in key order.
    exact_count = exact.sum(-1)  # (B, Hq, nb)
    width = int(exact_count.max())
    exact_idx = torch.sort(exact.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    exact_valid = torch.arange(width, device=device) < exact_count.unsqueeze(-1)  # (B, Hq, nb, S)

    # 3. LSH block per row: the lsh_block keys ending at (bucket(q), last key before the window).
    rows = r0 + torch.arange(nq - r0, device=device)
    row_block = (rows - r0) // qb
    lsh = budget.lsh_block
    use_lsh = lsh > 0 and nk > 0
    if use_lsh:
        k_bucket = lsh_buckets(k, draws.proj)  # (B, Hkv, Nk)
        composite = k_bucket * nk + keys
        sorted_comp, k_order = torch.sort(composite, dim=-1)
        q_bucket = lsh_buckets(q[:, :, r0:], draws.proj)  # (B, Hq, Nr)
        anchor = (shared_end[row_block] - 1 - budget.window - 1).clamp(min=0) if causal else \
            torch.clamp(block_start[row_block] + offset, 0, nk - 1)
        target = q_bucket * nk + anchor
        group = hq // hkv
        end = torch.searchsorted(sorted_comp.repeat_interleave(group, dim=1), target, right=True)
        start = (end - lsh) if causal else (end - lsh // 2)
        start = start.clamp(min=0, max=max(0, nk - lsh))
        span = min(lsh, nk)
        pos = start.unsqueeze(-1) + torch.arange(span, device=device)  # (B, Hq, Nr, lsh)
        lsh_idx = _gather_kv(k_order.unsqueeze(-1).float(), pos).squeeze(-1).long()
        lsh_idx = torch.sort(lsh_idx, dim=-1).values
        lsh_ok = _complement_lookup(complement, row_block, lsh_idx)
        pairs += span * (nq - r0)

    # 4. Samples of C_j by systematic sampling of a proposal pi (stratum s of the cumulative
    #    proposal [s/m, (s+1)/m) gives one draw), so column c is drawn m pi(c) times in
    #    expectation and weight 1 / (m pi(c)) makes the estimate unbiased (Hansen-Hurwitz).
    #    pi mixes uniform over C_j (weight sample_mix, which bounds every weight by
    #    |C_j| / (m sample_mix)) with the block-probe weights of the columns. When
    #    m >= |C_j| every column is taken once with weight 1 instead: exact.
    m = budget.sample_size
    comp_count = complement.sum(-1, keepdim=True)  # (B, Hq, nb, 1)
    uniform = complement.double() / comp_count.clamp(min=1)
    if block_mass is None:
        block_mass = key_block_score.repeat_interleave(kb, dim=-1)[..., :nk]
    tail_mass = block_mass.double().masked_fill(~complement, 0.0)
    tail_total = tail_mass.sum(-1, keepdim=True)
    guided = torch.where(tail_total > 0, tail_mass / tail_total.clamp(min=1e-300), uniform)
    proposal = budget.sample_mix * uniform + (1.0 - budget.sample_mix) * guided
    cdf = proposal.cumsum(-1)
    u = (torch.arange(m, device=device) + draws.samples.to(device).double()) / max(m, 1) * cdf[..., -1:]
    drawn = torch.searchsorted(cdf, u, side="right").clamp(max=nk - 1)
    drawn_logw = -torch.log(m * proposal.gather(-1, drawn))
    # Full budget: rank r of C_j is taken by draw r.
    rank = torch.arange(m, device=device).expand_as(drawn)
    every = torch.searchsorted(complement.long().cumsum(-1), rank + 1).clamp(max=nk - 1)
    full = comp_count <= m
    sample_idx = torch.where(full, every, drawn)
    sample_valid = torch.where(full, rank < comp_count, complement.gather(-1, drawn))
    sample_logw = torch.where(full, 0.0, drawn_logw.float()).masked_fill(~sample_valid, _NEG_INF)
    pairs += float(sample_valid.sum()) * qb / (bsz * hq)

    # 5. Attention per query block, in chunks of blocks that bound memory.
    qf = torch.nn.functional.pad(q[:, :, r0:], (0, 0, 0, num_blocks * qb - (nq - r0)))
    qf = qf.reshape(bsz, hq, num_blocks, qb, dim)
    if use_lsh:
        lsh_idx = torch.nn.functional.pad(lsh_idx, (0, 0, 0, num_blocks * qb - (nq - r0))).reshape(
            bsz, hq, num_blocks, qb, -1)
        lsh_ok = torch.nn.functional.pad(lsh_ok, (0, 0, 0, num_blocks * qb - (nq - r0))).reshape(
            bsz, hq, num_blocks, qb, -1)
    blocks = torch.arange(num_blocks, device=device) if blocks is None else blocks.to(device)
    chunk = max(1, (1 << 22) // max(1, hq * qb * (width + lsh + m)))
    outs, lses = [], []
    for c0 in range(0, len(blocks), chunk):
        sel = blocks[c0:c0 + chunk]
        qc = qf[:, :, sel]  # (B, Hq, c, qb, D)
        row_pos = block_start[sel].unsqueeze(-1) + torch.arange(qb, device=device)  # (c, qb)
        row_limit = row_pos + offset if causal else torch.full_like(row_pos, nk - 1)

        idx = exact_idx[:, :, sel]
        ke, ve = _gather_kv(k, idx), _gather_kv(v, idx)  # (B, Hq, c, S, D)
        s = (qc @ ke.transpose(-1, -2)) * scale
        mask = exact_valid[:, :, sel].unsqueeze(-2) & (idx.unsqueeze(-2) <= row_limit.unsqueeze(-1))
        o, l = softmax_lse(s.masked_fill(~mask, _NEG_INF), ve)

        idx = sample_idx[:, :, sel]
        ks, vs = _gather_kv(k, idx), _gather_kv(v, idx)
        s = (qc @ ks.transpose(-1, -2)) * scale + sample_logw[:, :, sel].unsqueeze(-2)
        if use_lsh:
            li, lok = lsh_idx[:, :, sel], lsh_ok[:, :, sel]  # (B, Hq, c, qb, L)
            # A sample that lies in the row's own LSH block (and counts there) is masked.
            li_sorted = torch.sort(li.masked_fill(~lok, -1), dim=-1).values
            drawn_keys = idx.unsqueeze(-2).expand(-1, -1, -1, qb, -1).contiguous()
            hit = torch.searchsorted(li_sorted, drawn_keys).clamp(max=li.shape[-1] - 1)
            s = s.masked_fill(li_sorted.gather(-1, hit) == drawn_keys, _NEG_INF)
            o, l = merge_lse(o, l, *softmax_lse(s, vs))
            kl, vl = _gather_kv(k, li), _gather_kv(v, li)  # (B, Hq, c, qb, L, D)
            s = (qc.unsqueeze(-2) @ kl.transpose(-1, -2)).squeeze(-2) * scale
            o_l, l_l = softmax_lse(s.masked_fill(~lok, _NEG_INF).unsqueeze(-2), vl)
            o, l = merge_lse(o, l, o_l.squeeze(-2), l_l.squeeze(-1))
        else:
            o, l = merge_lse(o, l, *softmax_lse(s, vs))
        outs.append(o)
        lses.append(l)
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)

    # Scores of the exact set that rows really see (causally visible keys only).
    row_limit = (rows + offset) if causal else torch.full_like(rows, nk - 1)
    per_block_rows = torch.nn.functional.pad(row_limit, (0, num_blocks * qb - (nq - r0)), value=-1)
    per_block_rows = per_block_rows.reshape(num_blocks, qb)
    seen = (exact_idx.unsqueeze(-2) <= per_block_rows.unsqueeze(-1)) & exact_valid.unsqueeze(-2)
    pairs += float(seen.sum()) / (bsz * hq)
    return out, lse, pairs


def _complement_lookup(complement: Tensor, row_block: Tensor, idx: Tensor) -> Tensor:
    """``complement[b, h, row_block[r], idx[b, h, r, l]]`` -> ``(B, Hq, Nr, L)`` bool."""
    bsz, hq, _, nk = complement.shape
    flat = complement.reshape(bsz, hq, -1)
    return flat.gather(-1, (row_block.unsqueeze(-1) * nk + idx).reshape(bsz, hq, -1)).reshape(idx.shape)


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


def _approx_rows(q, k, v, scale, causal, budget, seed, r0, eval_blocks=None, heads=None, num_heads=None):
    """Approximate rows from ``r0`` on, probe rows exact, and the per-head probe estimate.

    ``heads: (S, 2)`` (with ``num_heads = (B, Hq)`` of the whole call) names the (batch,
    head) pairs that ``q: (1, S, Nq, D)`` holds: each head gets the draws it has in the
    whole call, so a head's result does not depend on which other heads are computed.

    Returns ``out (B, Hq, R, D)``, ``lse (B, Hq, R)``, ``rows (R,)`` (the rows computed:
    all of ``[r0, Nq)``, or those of ``eval_blocks`` and the probe blocks), ``est (B, Hq)``
    and the scores per head of the full call.
    """
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    qb = budget.query_block
    num_blocks = math.ceil((nq - r0) / qb)
    if heads is None:
        draws = draw_structured(seed, dim, bsz, hq, num_blocks, budget)
    else:
        draws = _head_draws(draw_structured(seed, dim, *num_heads, num_blocks, budget), heads.cpu())
    probe_blocks = (draws.probe_blocks * num_blocks).long().clamp(max=num_blocks - 1)
    if eval_blocks is None:
        blocks = torch.arange(num_blocks)
    else:
        blocks = torch.unique(torch.cat([eval_blocks.cpu().long(), probe_blocks]))
    out, lse, pairs = structured_attention(q, k, v, scale, causal, budget, draws, r0, blocks)
    rows = (r0 + blocks.unsqueeze(-1) * qb + torch.arange(qb)).reshape(-1).to(q.device)
    keep = rows < nq
    out = out.reshape(bsz, hq, -1, out.shape[-1])[:, :, keep]
    lse = lse.reshape(bsz, hq, -1)[:, :, keep]
    rows = rows[keep]

    # Probe row p lies in probe block p % _PROBE_BLOCKS, at a random offset inside it.
    pb = probe_blocks[torch.arange(budget.probe_rows) % _PROBE_BLOCKS]
    pb_start = r0 + pb * qb
    pb_len = torch.clamp(nq - pb_start, max=qb)
    probe = (pb_start + torch.minimum((draws.probe * pb_len).long(), pb_len - 1)).to(q.device)  # (B, Hq, P)
    q_probe = q.gather(2, probe.unsqueeze(-1).expand(*probe.shape, dim))
    limit = probe + (nk - nq) + 1 if causal else torch.full_like(probe, nk)
    out_e, lse_e, _ = _rows_attention(q_probe, limit, k, v, scale)
    pairs += float(limit.clamp(max=nk).sum()) / (bsz * hq)
    local = torch.searchsorted(rows, probe).unsqueeze(-1)  # position of each probe row among `rows`
    est = _probe_error(out.gather(2, local.expand(-1, -1, -1, out.shape[-1])), out_e)
    # Probe rows were computed exactly anyway: their output is the exact one.
    out = out.scatter(2, local.expand(-1, -1, -1, out.shape[-1]), out_e)
    lse = lse.scatter(2, local.squeeze(-1), lse_e)
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


def _guarded_rows(qf, kf, vf, scale, causal, budget, seed, r0, eval_blocks, max_error, group, pairs, exact_heads):
    """Rows from ``r0`` on with the guard; adds each head's scores to ``pairs`` and marks ``exact_heads``.

    The tiers of :data:`_TIERS` are tried cheapest first on the probe rows only (about 1%
    of a full pass each); each head then runs once, at the first tier whose estimate meets
    ``max_error`` and that scores fewer keys than exact attention, or exactly. A head has
    the same draws in its trial and in its final run, so its probe blocks, its output
    there and its estimate are those the guard decided on.
    """
    bsz, hq, nq, _ = qf.shape
    probe_only = torch.zeros(0, dtype=torch.long)
    exact_cost = _exact_row_pairs(r0, nq, nq, kf.shape[2], causal)
    all_heads = torch.cartesian_prod(torch.arange(bsz), torch.arange(hq)).to(qf.device)  # (B*Hq, 2)
    hc = all_heads.cpu()
    level = torch.full((len(all_heads),), len(_TIERS), dtype=torch.long)
    pending = torch.ones(len(all_heads), dtype=torch.bool)

    def subset(idx):
        heads = all_heads[idx.to(qf.device)]
        q_sel = qf[heads[:, 0], heads[:, 1]].unsqueeze(0)
        return heads, q_sel, _select_heads(kf, heads, group), _select_heads(vf, heads, group)

    for i, factor in enumerate(_TIERS):
        idx = torch.nonzero(pending).squeeze(-1)
        if len(idx) == 0:
            break
        heads, q_sel, k_sel, v_sel = subset(idx)
        _, _, _, est_i, pairs_i = _approx_rows(q_sel, k_sel, v_sel, scale, causal, budget.scaled(factor),
                                               seed, r0, probe_only, heads, (bsz, hq))
        # A trial needs the approximate output of the probe rows only (their blocks' selection
        # is that of the full call): it scores what those rows score in the full call.
        pairs[hc[idx, 0], hc[idx, 1]] += pairs_i * min(budget.probe_rows, nq - r0) / (nq - r0)
        if pairs_i >= exact_cost:  # this and every larger tier cost more than exact attention
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
            o, l, rows, e, p = _approx_rows(qf, kf, vf, scale, causal, budget.scaled(factor), seed, r0, eval_blocks)
            pairs += p
            return o, l, rows, e
        heads, q_sel, k_sel, v_sel = subset(idx)
        o, l, rows, e, p = _approx_rows(q_sel, k_sel, v_sel, scale, causal, budget.scaled(factor), seed, r0,
                                        eval_blocks, heads, (bsz, hq))
        if out is None:
            out = qf.new_zeros(bsz, hq, len(rows), vf.shape[-1])
            lse = qf.new_zeros(bsz, hq, len(rows))
        out = out.index_put((heads[:, 0], heads[:, 1]), o[0])
        lse = lse.index_put((heads[:, 0], heads[:, 1]), l[0])
        est = est.index_put((heads[:, 0], heads[:, 1]), e[0])
        pairs[hc[idx, 0], hc[idx, 1]] += p
    idx = torch.nonzero(level == len(_TIERS)).squeeze(-1)
    if len(idx) > 0:
        heads, q_sel, k_sel, v_sel = subset(idx)
        o, l = attention_lse(q_sel, k_sel, v_sel, scale, causal)
        if rows is None:
            rows = _computed_rows(nq, r0, budget, seed, qf.shape[-1], bsz, hq, eval_blocks).to(qf.device)
            out = qf.new_zeros(bsz, hq, len(rows), vf.shape[-1])
            lse = qf.new_zeros(bsz, hq, len(rows))
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
    draws = draw_structured(seed, dim, bsz, hq, num_blocks, budget)
    probe_blocks = (draws.probe_blocks * num_blocks).long().clamp(max=num_blocks - 1)
    blocks = torch.unique(torch.cat([eval_blocks.cpu().long(), probe_blocks]))
    rows = (r0 + blocks.unsqueeze(-1) * qb + torch.arange(qb)).reshape(-1)
    return rows[rows < nq]


def structured_run(q, k, v, scale, causal, budget: Budget, seed: int, max_error: float | None, stats_type,
                   eval_blocks: Tensor | None = None):
    """:func:`run` with an explicit :class:`Budget`; returns ``(out, lse, stats, rows)``.

    ``eval_blocks=None`` computes every row (``rows`` is ``arange(Nq)``). The evaluation
    passes query-block indices to compute only those blocks (and the probe blocks): the
    rows it gets back are identical to the full call's and ``stats`` is the full call's,
    but rows exact by construction (before ``min_seq_len``) are skipped.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    # No complement has more than Nk columns, and m >= |C_j| already means "all of them":
    # a larger m would only draw unused uniforms.
    budget = dataclasses.replace(budget, sample_size=min(budget.sample_size, nk))
    group = hq // hkv
    qf, kf, vf = q.float(), k.float(), v.float()
    offset = nk - nq
    r0 = first_approx_row(nq, nk, causal, budget.min_seq_len)
    pairs = torch.zeros(bsz, hq, dtype=torch.float64)
    outs, lses = [], []
    if r0 > 0:
        k_end = max(r0 + offset, 0) if causal else nk
        pairs += _exact_row_pairs(0, r0, nq, nk, causal)
        if eval_blocks is None:
            o, l = attention_lse(qf[:, :, :r0], kf[:, :, :k_end], vf[:, :, :k_end], scale, causal)
            outs.append(o)
            lses.append(l)
    zeros = torch.zeros(bsz, hq, device=q.device)
    exact_heads = torch.zeros(bsz, hq, dtype=torch.bool, device=q.device)
    if r0 == nq:
        stats = stats_type("structured", float(pairs.mean()) / nq, zeros, ~exact_heads)
        return outs[0], lses[0], stats, torch.arange(nq, device=q.device)

    if max_error is None:
        out, lse, rows, est, approx_pairs = _approx_rows(qf, kf, vf, scale, causal, budget, seed, r0, eval_blocks)
        pairs += approx_pairs
    else:
        out, lse, rows, est = _guarded_rows(qf, kf, vf, scale, causal, budget, seed, r0, eval_blocks, max_error,
                                            group, pairs, exact_heads)
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
