"""Driver of ``method="structured"``: selection, guard, attention backend, exact parts, stats.

A call runs, per (batch, head):

1. rows that see at most ``min_seq_len`` keys: exact (SDPA on CUDA);
2. per chunk of ``chunk`` rows: probe rows scored exactly, which give the chunk's heavy
   columns and the guard's error estimates (:func:`~hyperattn.reference.selection.probe_exact`);
3. the guard: each chunk takes the cheapest tier of :data:`~hyperattn.reference.selection.TIERS`
   whose error on the chunk's probe rows, at a one-sided 90% upper bound (:func:`_rel_error`),
   is at most ``max_error`` (trials run on the probe rows only), else exact; without
   ``max_error`` every chunk runs at 1x;
4. the selection of every query block (its exact blocks,
   :func:`~hyperattn.reference.selection.exact_blocks`, and each chunk's gathered columns,
   :func:`~hyperattn.reference.selection.gather_columns`), then one attention step: the
   block-sparse, gathered and LSH passes merged by LSE (:func:`hyperattn.kernels.structured.attend` on CUDA,
   :func:`hyperattn.reference.structured.attend` elsewhere);
5. chunks the guard sent to exact attention: SDPA, all heads of a chunk in one call.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..reference import selection as sel_ref
from ..reference import structured as attend_ref
from ..reference.exact import exact_pairs
from ..reference.selection import TIERS
from ..stats import AttentionStats
from .exact import exact

__all__ = ["run", "default_min_seq_len", "exact_only", "backward_on_kernels"]

# Keys at and below which the default is exact attention, per device type: on CUDA the
# length where the approximate path stops being faster than SDPA (benchmarks/NOTES.md);
# elsewhere the PyTorch reference runs, which is for correctness, not speed.
_CROSSOVER = {"cuda": 131072}
_CPU_MIN_SEQ_LEN = 1024

# Block scores held at once, (batch, heads, query blocks, key blocks) fp32: 512 MiB. The
# query blocks of a piece are whole chunks (the first piece ends at a chunk's end), so each
# chunk's score sums are one sum whatever the heads in the call or the piece size.
_SELECT_ELEMENTS = 1 << 27


def default_min_seq_len(device: torch.device) -> int:
    """The structured method's ``min_seq_len`` when the config leaves it ``None``."""
    return _CROSSOVER.get(device.type, _CPU_MIN_SEQ_LEN)


def exact_only(q: Tensor, k: Tensor, causal: bool, config) -> bool:
    """Whether a call is exact attention throughout (every row sees at most ``min_seq_len`` keys)."""
    nq, nk = q.shape[2], k.shape[2]
    min_len = config.min_seq_len if config.min_seq_len is not None else default_min_seq_len(q.device)
    return sel_ref.first_block(nq, nk, causal, config.query_block, min_len) * config.query_block >= nq


def _kernels_ok(q: Tensor) -> bool:
    # float64 (gradcheck) runs the reference on every device, like the other methods.
    if not q.is_cuda or q.dtype == torch.float64:
        return False
    from ..kernels.structured import supported

    return supported(q)


def backward_on_kernels(q: Tensor, config) -> bool:
    """Whether a gradient of this call comes from Triton kernels (O(N) kept; else the reference's autograd)."""
    if not _kernels_ok(q):
        return False
    from ..kernels.structured import TILE

    return config.query_block == TILE


# One-sided normal quantile of the guard's upper bound on a chunk's error (90%).
_BOUND_Z = 1.28


def _rel_error(approx: Tensor, ref: Tensor, valid: Tensor, rows_per_block: int) -> tuple[Tensor, Tensor]:
    """``||approx - ref|| / ||ref||`` over the valid rows of each chunk, and an upper bound of it.

    Inputs ``(B, Hq, C, P, D)``, ``P`` rows in probe blocks of ``rows_per_block``. The bound
    is a one-sided 90% confidence bound on the ratio ``sum ||approx - ref||^2 / sum ||ref||^2``
    with the probe blocks as clusters (the ratio estimator's linearised variance): a head
    whose error is heavy-tailed over blocks has estimating rows that disagree, and its
    bound is well above its estimate (docs/QUALITY.md).
    """
    *lead, p, _ = approx.shape

    def per_block(x):  # (..., P) -> (..., P / rows_per_block, rows_per_block)
        return x.reshape(*lead, p // rows_per_block, rows_per_block)

    mask = valid.unsqueeze(-1).to(ref.dtype)
    num = per_block(((approx - ref) ** 2 * mask).sum(-1)).sum(-1)
    den = per_block((ref ** 2 * mask).sum(-1)).sum(-1)
    used = per_block(valid).any(-1).to(ref.dtype)
    total = den.sum(-1).clamp(min=1e-30)
    ratio = num.sum(-1) / total
    m = used.sum(-1)
    var = m / (m - 1).clamp(min=1) * (((num - ratio.unsqueeze(-1) * den) * used) ** 2).sum(-1) / total ** 2
    return torch.sqrt(ratio), torch.sqrt(ratio + _BOUND_Z * torch.sqrt(var))


def run(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, config, seed: int, need_lse: bool = True,
        head_offset: int = 0, need_stats: bool = True, total_heads: int | None = None
        ) -> tuple[Tensor, Tensor | None, AttentionStats]:
    """``method="structured"`` on validated inputs.

    ``head_offset`` numbers the heads globally (draws are per global head, so the total
    count, ``total_heads``, changes nothing and is not used). Without the
    guard and with ``need_stats`` False the probe rows' trial is skipped (it only estimates
    the error) and nothing waits for the GPU: the output is the same, and the stats are
    placeholders (``est_error`` 0, ``keys_per_query`` NaN, ``exact_heads`` False). Without
    the guard, the chunks that run exact are found without a host wait (the driver's
    ``maybe_exact``).

    Returns ``out (B, Hq, Nq, D)`` in q's dtype, ``lse (B, Hq, Nq)`` fp32 (``None`` when
    ``need_lse`` is False and SDPA computed a part) and :class:`~hyperattn.stats.AttentionStats`.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    device = q.device
    min_len = config.min_seq_len if config.min_seq_len is not None else default_min_seq_len(device)
    zeros = torch.zeros(bsz, hq, device=device)
    first_row = min(nq, sel_ref.first_block(nq, nk, causal, config.query_block, min_len) * config.query_block)
    if first_row >= nq:  # below the crossover (exact_only): exact, before any selection work
        out, lse = exact(q, k, v, scale, causal, need_lse)
        return out, lse, AttentionStats("structured", exact_pairs(0, nq, nq, nk, causal) / nq, zeros,
                                        torch.ones(bsz, hq, dtype=torch.bool, device=device))
    plan = _plan(nq, nk, causal, config.query_block, config.window, config.chunk, min_len, device)
    kernels = _kernels_ok(q)
    if kernels:
        from ..kernels import selection as select_impl
        from ..kernels import structured as attend_impl
    else:
        select_impl, attend_impl = sel_ref, attend_ref
    # The reference computes in fp32; the kernels take the inputs as they are.
    qc, kc, vc = (q, k, v) if kernels or q.dtype == torch.float64 else (q.float(), k.float(), v.float())
    # The selection (probes, scores, hashes, samples, the guard's trials) is fixed for the
    # step: computed on detached inputs, so autograd differentiates the attention step only
    # (the exact gradient of the approximate function) and builds no graph for the rest.
    qd, kd, vd = qc.detach(), kc.detach(), vc.detach()
    owned = backward_on_kernels(q, config) and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    # Without the guard the exact rows before the selection are always kept: launched first,
    # SDPA runs them while the host enqueues the selection (at 32k the call waits on the
    # host until the attention launches, which come last). With the guard every chunk may
    # end exact, and one SDPA call over all rows would make them wasted work.
    head = _exact_head(q, k, v, scale, causal, plan, need_lse) if config.max_error is None and not owned else None
    heads = torch.arange(hq, device=device) + head_offset
    group = hq // hkv
    kv_heads = torch.arange(hkv, device=device) + head_offset // group
    t = plan.block
    nc = plan.num_chunks
    pb = config.probe_blocks
    rpb = max(1, math.ceil(config.probe_rows / pb))
    tiers = TIERS if config.max_error is not None else (1.0,)
    kmax = round(config.key_blocks * tiers[-1])

    # 2. Probe rows (heavy columns per KV head from the group's summed mass), block scores
    #    (ranked per query block, summed per chunk for the residual proposal), LSH blocks.
    probe = select_impl.probe_rows(plan, seed, bsz, heads, pb, rpb)  # (B, Hq, C, P)
    # Without the guard and the stats only the heavy columns are wanted from the probe rows.
    trial = config.max_error is not None or need_stats
    probe_out, _, heavy, probe_pairs = select_impl.probe_exact(qd, kd, vd, scale, plan, probe, config.heavy_columns,
                                                               config.num_sinks, pb, need_out=trial,
                                                               span=config.heavy_span)
    pooled = select_impl.pool(qd, kd, plan, config.score_group)
    ranked = torch.full((bsz, hq, plan.nqb, min(kmax, plan.nkb)), -1, dtype=torch.long, device=device)
    c_scores = torch.zeros(bsz, hkv, nc, plan.nkb, device=device)
    j_all = torch.arange(plan.nqb, device=device)
    cb = plan.chunk_blocks
    step = max(1, _SELECT_ELEMENTS // max(1, bsz * hq * plan.nkb * cb)) * cb
    j0 = plan.first
    while j0 < plan.nqb:
        j1 = min(plan.nqb, j0 // cb * cb + step)
        blocks = j_all[j0:j1].expand(bsz, hq, -1)
        scores = select_impl.block_scores(pooled, scale, plan, blocks)
        ranked[:, :, j0:j1] = select_impl.rank_blocks(scores, kmax)
        c_scores += sel_ref.chunk_scores(scores, j0, plan, hkv)
        j0 = j1
    lsh = select_impl.lsh_ranges(qd, kd, plan, config.lsh_block, config.lsh_num_projs, seed)
    # Scored pairs per head, for the stats (counted with the trial, which the stats imply).
    pairs = probe_pairs + torch.full((bsz, hq), exact_pairs(0, first_row, nq, nk, causal), dtype=torch.float64,
                                     device=device) if trial else None

    # 3. The guard's trials on the probe rows (with no guard: the 1x tier, for the estimate).
    chunk_ok = probe[..., 0] >= 0  # (B, Hq, C): chunks with approximate rows
    # Each chunk's approximate rows [r0, r1) (empty before first_row) and their exact cost.
    bounds, rows_host, exact_cost_host, exact_cost, chunk_rows = _chunk_costs(nq, nk, causal, config.chunk, first_row,
                                                                              nc, device)
    # Without the guard, the chunks that may run exact (their measured cost per row is only
    # known on the GPU): those whose nominal budget per row (exact blocks, gathered columns,
    # LSH block: an upper bound of the measured one) is not below exact attention's. Found
    # on the host from shapes, so the call never waits for the GPU; none at usual lengths.
    nominal = ((config.key_blocks + plan.win_width) * t + min(config.sample_size, nk) + config.heavy_columns
               + config.num_sinks + config.lsh_block)
    maybe_exact = [c for c in range(nc) if 0 < exact_cost_host[c] <= nominal * rows_host[c]]
    # Without the guard, stats or chunks that may run exact, every chunk is cheaper than
    # exact attention (the nominal budget bounds the measured one): no count needed, and
    # nothing is built for the probe rows (each launch costs host time at 32k).
    counted = trial or bool(maybe_exact)
    if counted:
        level = torch.full((bsz, hq, nc), len(tiers), dtype=torch.long, device=device)  # len(tiers): exact
        est = torch.zeros(bsz, hq, nc, device=device)
        # The estimating rows' exact outputs and mask, (B, Hq, C, P / 2, ...).
        est_out = _odd(probe_out.reshape(bsz, hq, nc * pb, rpb, -1), nc, pb).reshape(bsz, hq, nc, -1, dim) \
            if trial else None
        est_valid = _odd(sel_ref.estimating_rows(probe, pb).reshape(bsz, hq, nc * pb, rpb), nc, pb).reshape(
            bsz, hq, nc, -1)
        p_blocks = (probe.reshape(bsz, hq, nc, pb, rpb)[..., 0].clamp(min=0) // t).reshape(bsz, hq, nc * pb)
        p_rows = probe.reshape(bsz, hq, nc * pb, rpb)
        p_ranked = ranked.gather(2, p_blocks.unsqueeze(-1).expand(-1, -1, -1, ranked.shape[-1]))
    for i, factor in enumerate(tiers):
        if counted:
            pending = (level == len(tiers)) & chunk_ok
            # At the first tier every chunk with rows is pending, and the last chunk has rows
            # (first_row < nq): no host wait for the selection to finish before the trial.
            if config.max_error is not None and i > 0 and not bool(pending.any()):
                break
        m = min(round(config.sample_size * factor), nk)
        g_idx, g_logw = select_impl.gather_columns(plan, c_scores, heavy, torch.full((bsz, hkv, nc), m, device=device),
                                               m, config.num_sinks, config.sample_mix, seed, kv_heads)
        if not counted:  # every chunk with rows approximates at the 1x tier: nothing to decide
            break
        kj = torch.full_like(p_blocks, round(config.key_blocks * factor))
        sel = sel_ref.Selection(p_blocks, sel_ref.exact_blocks(plan, p_blocks, p_ranked, kj),
                                torch.ones_like(p_blocks, dtype=torch.bool), g_idx, g_logw)
        per_row = _keys_per_row(plan, sel, lsh, p_rows).reshape(bsz, hq, nc, -1).mean(-1)
        if trial:
            # Only the estimating probe blocks (the odd ones, reference.selection.finders) are
            # compared: the trial attends their rows alone, half the launch.
            approx, _ = attend_impl.attend_rows(qd, kd, vd, scale, plan, _odd_blocks(sel, nc, pb), lsh,
                                                _odd(p_rows, nc, pb))
            err, bound = _rel_error(approx.reshape(bsz, hq, nc, pb // 2 * rpb, -1), est_out, est_valid, rpb)
            pairs += (per_row * (probe >= 0).sum(-1)).sum(-1).double()
        else:
            err = bound = est
        cheaper = per_row.double() * chunk_rows < exact_cost
        # A tier is taken when the error's upper bound meets max_error; the estimate itself is
        # what the stats report.
        ok = pending & cheaper & ((bound <= config.max_error) if config.max_error is not None else True)
        level = torch.where(ok, i, level)
        est = torch.where(ok, err, est)
        if config.max_error is None:
            break
        # The sampled part's error falls about as 1/sqrt(budget): a chunk whose estimate asks
        # for more than twice the largest tier's budget goes to exact now instead of trying
        # every tier (random, diffuse heads: one trial instead of six).
        hopeless = (factor * (err / config.max_error) ** 2 > 2 * tiers[-1]) | ~cheaper
        level = torch.where(pending & ~ok & hopeless, len(tiers) + 1, level)

    # 4. Every query block at its chunk's tier, then the attention step.
    approx_chunk = (level < len(tiers)) & chunk_ok if counted else chunk_ok
    # Every chunk exact: one SDPA call, as if the guard were not there (without the guard
    # every chunk with rows approximates: no host sync to ask).
    if config.max_error is not None and not bool(approx_chunk.any()):
        out, lse = exact(q, k, v, scale, causal, need_lse)
        pairs = pairs + exact_pairs(first_row, nq, nq, nk, causal)
        return out, lse, AttentionStats("structured", float(pairs.mean()) / nq, zeros,
                                        torch.ones(bsz, hq, dtype=torch.bool, device=device),
                                        exact_chunks=chunk_ok)
    blocks = j_all[plan.first:].expand(bsz, hq, -1)
    if counted:
        factors = torch.zeros(level.shape, device=device)  # (B, Hq, C): each chunk's tier, 0 for exact
        for i, factor in enumerate(tiers):
            factors = torch.where(level == i, factor, factors)
        chunk_of = blocks // plan.chunk_blocks
        active = approx_chunk.gather(2, chunk_of)
        kj_all = torch.where(active, (factors.gather(2, chunk_of) * config.key_blocks).round().long(), 0)
        # The query heads of a KV head share its gathered columns: a chunk draws the most
        # samples any of them needs (more samples only lower a head's error).
        if config.max_error is not None:
            m_chunk = (factors.reshape(bsz, hkv, group, nc).amax(2) * config.sample_size).round().long().clamp(max=nk)
            g_idx, g_logw = select_impl.gather_columns(plan, c_scores, heavy, m_chunk,
                                                       min(round(config.sample_size * tiers[-1]), nk),
                                                       config.num_sinks, config.sample_mix, seed, kv_heads)
        # Without the guard the one trial drew every chunk's columns at the 1x tier already
        # (chunks left exact use none of them).
        sel = sel_ref.Selection(blocks, torch.where(active.unsqueeze(-1), sel_ref.exact_blocks(
            plan, blocks, ranked[:, :, plan.first:], kj_all), -1), active, g_idx, g_logw)
        row_block = torch.arange(nq, device=device) // t
        row_active = (row_block >= plan.first) & approx_chunk.gather(
            2, (row_block // plan.chunk_blocks).expand(bsz, hq, -1))
        lsh = sel_ref.Lsh(lsh.order, lsh.slot, torch.where(row_active, lsh.lo, 0),
                          torch.where(row_active, lsh.hi, 0), lsh.q_order)
    else:
        # Every selected block approximates at the 1x tier (its chunk has approximate rows),
        # and rows before plan.first have empty LSH ranges already: no tables per chunk.
        sel = sel_ref.Selection(blocks, sel_ref.exact_blocks(plan, blocks, ranked[:, :, plan.first:],
                                                             config.key_blocks),
                                torch.ones_like(blocks, dtype=torch.bool), g_idx, g_logw)
    if need_stats or config.max_error is not None:
        pairs += _keys_per_row(plan, sel, lsh, None).sum(-1).double()
    # 1. Rows before min_seq_len: exact. Under autograd on the kernels one Function computes
    #    them with the attention step into one buffer (_KernelStep).
    if owned:
        out, lse = _KernelStep.apply(*(x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)), scale,
                                     causal, plan, sel, lsh, need_lse)
        lse = lse if need_lse else None
    else:
        out, lse = _assemble(q, k, v, (qc, kc, vc), scale, causal, plan, sel, lsh, attend_impl, kernels, need_lse,
                             head)

    # 5. The chunks the guard sent to exact (written over the step's inactive rows).
    exact_chunk = chunk_ok & ~approx_chunk
    if owned and (maybe_exact if config.max_error is None else bool(exact_chunk.any())):
        # The writes below change rows of the step's output in place, which its backward saved.
        out, lse = out.clone(), (lse.clone() if lse is not None else None)
    if config.max_error is None:
        # The chunks that may run exact, all heads in one SDPA call each, kept where the
        # measured cost chose exact: selected on the GPU, no host wait.
        for c in maybe_exact:
            r0, r1 = bounds[c]
            k_end = r1 + plan.offset if causal else nk
            o, l = exact(q[:, :, r0:r1], k[:, :, :k_end], v[:, :, :k_end], scale, causal, need_lse)
            pick = exact_chunk[:, :, c]
            out[:, :, r0:r1] = torch.where(pick[..., None, None], o, out[:, :, r0:r1])
            if lse is not None:
                lse[:, :, r0:r1] = torch.where(pick[..., None], l if l is not None else 0.0, lse[:, :, r0:r1])
            if pairs is not None:
                pairs += torch.where(pick, exact_cost[c], 0.0)
    elif bool(exact_chunk.any()):
        exact_chunk_cpu = exact_chunk.cpu()
        for c in range(nc):
            pick = torch.nonzero(exact_chunk_cpu[:, :, c])
            if len(pick) == 0:
                continue
            r0, r1 = bounds[c]
            k_end = r1 + plan.offset if causal else nk
            b_i, h_i = pick[:, 0].to(device), pick[:, 1].to(device)
            qs = q[b_i, h_i, r0:r1].unsqueeze(0)
            ks, vs = k[b_i, h_i // group, :k_end].unsqueeze(0), v[b_i, h_i // group, :k_end].unsqueeze(0)
            o, l = exact(qs, ks, vs, scale, causal, need_lse)
            out[b_i, h_i, r0:r1] = o[0]
            if lse is not None and l is not None:
                lse[b_i, h_i, r0:r1] = l[0]
            pairs[b_i, h_i] += exact_cost[c]
            est[b_i, h_i, c] = 0.0
    if not need_stats and config.max_error is None:
        # Nobody reads these stats (the public call drops them): no launches for them, and
        # keys_per_query, a host number, would wait for the GPU.
        return out, lse, AttentionStats("structured", float("nan"), zeros, zeros.bool(), exact_chunks=exact_chunk)
    weight = chunk_ok.double()
    est_head = torch.sqrt((est.double() ** 2 * weight).sum(-1) / weight.sum(-1).clamp(min=1)).float()
    stats = AttentionStats("structured", float(pairs.mean()) / nq, est_head, ~approx_chunk.any(-1) & chunk_ok.any(-1),
                           exact_chunks=exact_chunk)
    return out, lse, stats


def _odd(x: Tensor, nc: int, pb: int) -> Tensor:
    """The odd probe blocks' entries of ``x (B, Hq, C * pb, ...)``: ``(B, Hq, C * pb / 2, ...)``."""
    return x.reshape(*x.shape[:2], nc, pb, *x.shape[3:])[:, :, :, 1::2].reshape(*x.shape[:2], -1, *x.shape[3:])


def _odd_blocks(sel, nc: int, pb: int):
    """``sel`` (of the probe blocks) restricted to the odd probe blocks: those whose rows estimate the error."""
    return sel_ref.Selection(_odd(sel.blocks, nc, pb), _odd(sel.exact_blocks, nc, pb), _odd(sel.active, nc, pb),
                             sel.gather_idx, sel.gather_logw)


def _exact_head(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, plan, need_lse: bool):
    """Exact attention of the rows before the selection's first block (``row0`` of them, may be 0)."""
    row0 = min(plan.first * plan.block, q.shape[2])
    k_end = max(row0 + plan.offset, 0) if causal else k.shape[2]
    if row0 == 0:
        return 0, k_end, (None, None)
    return row0, k_end, exact(q[:, :, :row0], k[:, :, :k_end], v[:, :, :k_end], scale, causal, need_lse)


def _assemble(q, k, v, step_inputs, scale, causal, plan, sel, lsh, attend_impl, kernels: bool, need_lse: bool,
              head=None):
    """``out, lse`` of every row: the attention step's rows (on ``step_inputs``), after the exact rows before them.

    ``head``: :func:`_exact_head`'s result when the caller computed it already (else computed here).
    """
    bsz, hq, nq, _ = q.shape
    out_a, lse_a = attend_impl.attend(*step_inputs, scale, plan, sel, lsh)
    first_row = nq - out_a.shape[2]
    out = _trailing_rows_of(out_a, nq) if out_a.dtype == q.dtype and not out_a.requires_grad else None
    if out is None:
        out = torch.empty(bsz, hq, nq, v.shape[-1], dtype=q.dtype, device=q.device)
        out[:, :, first_row:] = out_a.to(q.dtype)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty(bsz, hq, nq, dtype=lse_dtype, device=q.device) if need_lse or not kernels else None
    if lse is not None:
        lse[:, :, first_row:] = lse_a
    if first_row > 0:
        _, _, (o, l) = head if head is not None else _exact_head(q, k, v, scale, causal, plan, need_lse)
        out[:, :, :first_row] = o
        if lse is not None:
            lse[:, :, :first_row] = l if l is not None else 0.0
    return out, lse


class _KernelStep(torch.autograd.Function):
    """The attention step on the Triton kernels and the exact rows before it, as one output, with their gradient.

    One buffer holds every row, so autograd copies and adds nothing around the parts (as
    separate pieces, the step's rows copied into a full-length output and the exact rows'
    slices of q, k, v, their gradients' zero-fills, copies and adds cost ~8 ms of a 77 ms
    step at 131k). The exact rows' gradient comes from recomputing them in the backward
    (``row0`` x ``row0`` causal: a small share of the step).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, plan, sel, lsh, need_lse):
        from ..kernels.sparse import attend_forward

        out, lse, tab = attend_forward(q, k, v, scale, plan, sel, lsh)
        row0, k_end, (o, l) = _exact_head(q, k, v, scale, causal, plan, need_lse)
        if row0:
            out[:, :, :row0] = o
            if l is not None:
                lse[:, :, :row0] = l
        ctx.set_materialize_grads(False)  # an unused output (often the LSE) costs no zero tensor
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.plan, ctx.tab, ctx.row0, ctx.k_end = scale, causal, plan, tab, row0, k_end
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from ..kernels.sparse import attend_backward

        q, k, v, out, lse = ctx.saved_tensors
        row0, k_end = ctx.row0, ctx.k_end
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        dq, dk, dv = attend_backward(q, k, v, out, lse, grad_out, None if grad_lse is None else grad_lse[:, :, row0:],
                                     ctx.scale, ctx.plan, ctx.tab)
        if row0:
            with torch.enable_grad():
                parts = [x.detach().requires_grad_() for x in (q[:, :, :row0], k[:, :, :k_end], v[:, :, :k_end])]
                o, l = exact(*parts, ctx.scale, ctx.causal, grad_lse is not None)
                outs, grads = [o], [grad_out[:, :, :row0]]
                if grad_lse is not None:
                    outs.append(l)
                    grads.append(grad_lse[:, :, :row0])
                gq, gk, gv = torch.autograd.grad(outs, parts, grads)
            dq[:, :, :row0] = gq
            dk[:, :, :k_end] += gk
            dv[:, :, :k_end] += gv
        return dq, dk, dv, None, None, None, None, None, None


@functools.lru_cache(maxsize=64)
def _plan(nq: int, nk: int, causal: bool, block: int, window: int, chunk: int, min_len: int, device: torch.device):
    # One plan per shape and device, its tables copied to the device once: every layer of a
    # model and every call of a benchmark reuse them (a pinned copy per call costs host
    # time; the plan is never written to).
    return sel_ref.make_plan(nq, nk, causal, block, window, chunk, min_len, device)


@functools.lru_cache(maxsize=64)
def _chunk_costs(nq: int, nk: int, causal: bool, chunk: int, first_row: int, nc: int, device: torch.device):
    """Each chunk's approximate rows ``[r0, r1)``, their count and exact cost (host lists; read-only device copies)."""
    bounds = [(max(c * chunk, first_row), min((c + 1) * chunk, nq)) for c in range(nc)]
    rows_host = [max(0, r1 - r0) for r0, r1 in bounds]
    exact_cost_host = [exact_pairs(r0, r1, nq, nk, causal) for r0, r1 in bounds]
    exact_cost = sel_ref.to_device(torch.tensor(exact_cost_host, dtype=torch.float64), device)
    return bounds, rows_host, exact_cost_host, exact_cost, sel_ref.to_device(torch.tensor(rows_host), device)


def _trailing_rows_of(part: Tensor, nq: int) -> Tensor | None:
    """The full-length contiguous tensor whose last rows ``part`` is a view of, else ``None``.

    The CUDA attention pass writes its rows into a full-length output in the inputs' dtype;
    taking that tensor spares a copy of the whole output (0.6 ms at 131k on an H200).
    """
    base = part._base
    if base is None or base.dim() != 4 or base.shape[:2] != part.shape[:2] or base.shape[2:] != (nq, part.shape[3]):
        return None
    if not base.is_contiguous() or part.stride() != base.stride():
        return None
    return base if part.data_ptr() == base[:, :, nq - part.shape[2]:].data_ptr() else None


def _keys_per_row(plan, sel, lsh, rows) -> Tensor:
    """Keys scored per row of each selected block, ``(B, Hq, c)`` summed over rows (``rows`` given: mean per row)."""
    t = plan.block
    blocks = sel.exact_blocks
    device = blocks.device
    row = (sel.blocks.unsqueeze(-1) * t + torch.arange(t, device=device)) if rows is None else rows
    valid = (row >= 0) & (row < plan.nq)
    limit = row + plan.offset if plan.causal else torch.full_like(row, plan.nk - 1)
    start = (blocks * t).unsqueeze(-2)
    size = torch.clamp(plan.nk - blocks * t, max=t).unsqueeze(-2)
    seen = torch.clamp(limit.unsqueeze(-1) - start + 1, min=0)
    seen = torch.minimum(seen, size) * (blocks >= 0).unsqueeze(-2)
    hq, hkv = blocks.shape[1], sel.gather_logw.shape[1]
    b_of = torch.arange(blocks.shape[0], device=device).view(-1, 1, 1)
    kv_of = (torch.arange(hq, device=device) // (hq // hkv)).view(1, -1, 1)
    gathered = torch.isfinite(sel.gather_logw).sum(-1)[b_of, kv_of, sel.blocks // plan.chunk_blocks]
    gathered = (gathered * sel.active).unsqueeze(-1)
    rc = row.clamp(0, plan.nq - 1)
    lsh_len = (lsh.hi - lsh.lo).gather(2, rc.reshape(rc.shape[0], rc.shape[1], -1)).reshape(rc.shape)
    per_row = (seen.sum(-1) + gathered + lsh_len) * valid
    return per_row.sum(-1).float() if rows is None else per_row.float()
