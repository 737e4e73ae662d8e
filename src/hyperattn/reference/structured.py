"""The attention step of the structured method (``method="structured"``), written for reading.

Given a :class:`~hyperattn.reference.selection.Selection` and the rows' LSH blocks
(:class:`~hyperattn.reference.selection.Lsh`), row ``r`` of query block ``j`` attends

- exactly: the keys of ``E_j`` it sees (window and top blocks), and its LSH block ``L_r``
  minus ``E_j``;
- with weights: the gathered columns (sinks and heavy columns at log-weight 0, residual
  samples at their Hansen-Hurwitz log-weight), each masked where it lies in ``L_r``;

and the three parts are one softmax: ``out = sum_c w_c exp(s_rc) v_c / sum_c w_c exp(s_rc)``,
``lse = log sum_c w_c exp(s_rc)``. That is the LSE-merge of the block-sparse pass, the
LSH pass and the gathered pass that the kernels run (:mod:`hyperattn.kernels.structured`,
which mirrors this module function for function).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .exact import compute_dtype, merge_lse, softmax_lse
from .selection import Lsh, Plan, Selection

__all__ = ["attend", "attend_rows", "block_columns"]

# Scores materialised at once (rows x listed keys); bounds memory.
_PIECE = 1 << 24


def _gather_rows(x: Tensor, idx: Tensor, group: int) -> Tensor:
    """Rows of ``x (B, Hkv, N, D)`` at ``idx (B, Hq, ...)``: ``(B, Hq, ..., D)`` without repeating ``x`` per head."""
    bsz, hkv, _, dim = x.shape
    flat = idx.reshape(bsz, hkv, -1)
    return x.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, dim)).reshape(*idx.shape, dim)


def block_columns(plan: Plan, sel: Selection) -> tuple[Tensor, Tensor]:
    """Each selected block's share of its chunk's gathered columns: ``idx, logw (B, Hq, c, S)``.

    A column counts for block ``j`` where it lies in the block's complement ``C_j`` (its
    key block is a candidate of ``j`` and not one of ``j``'s exact blocks) and the block is
    active; elsewhere its log-weight is ``-inf``.
    """
    bsz, hq, _ = sel.blocks.shape
    group = hq // sel.gather_idx.shape[1]
    device = sel.blocks.device
    kv_of = (torch.arange(hq, device=device) // group).view(1, hq, 1)
    b_of = torch.arange(bsz, device=device).view(bsz, 1, 1)
    chunk = sel.blocks // plan.chunk_blocks
    idx = sel.gather_idx[b_of, kv_of, chunk]
    blk = idx // plan.block
    in_comp = plan.candidates(sel.blocks).gather(-1, blk)
    in_comp &= ~(blk.unsqueeze(-1) == sel.exact_blocks.unsqueeze(-2)).any(-1)
    # The log-weights are part of the selection: constants of the approximate function, as
    # the sample indices are. (They come from block scores of q and k; differentiating them
    # would add the proposal's own derivative, which no backward kernel computes and which
    # the fp32 selection would only give to fp32 accuracy.)
    logw = torch.where(in_comp & sel.active.unsqueeze(-1), sel.gather_logw.detach()[b_of, kv_of, chunk],
                       float("-inf"))
    return idx, logw


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh
           ) -> tuple[Tensor, Tensor]:
    """Approximate attention of every row from query block ``plan.first`` on.

    ``sel`` selects blocks ``plan.first .. nqb - 1`` (in order) for every head. Returns
    ``out (B, Hq, Nq - first * block, D)`` and ``lse`` of those rows, fp32 (float64 for
    float64 inputs; ``-inf`` and 0 for rows that attend nothing: chunks the guard left to
    exact attention).
    """
    bsz, hq, c = sel.blocks.shape
    out, lse = attend_rows(q, k, v, scale, plan, sel, lsh)
    rows = plan.nq - plan.first * plan.block
    return out.reshape(bsz, hq, c * plan.block, -1)[:, :, :rows], lse.reshape(bsz, hq, -1)[:, :, :rows]


def attend_rows(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh,
                rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Approximate attention of rows of the selection's query blocks (the guard's trials use it on probe rows).

    ``rows (B, Hq, c, R)``: rows of each of the ``c`` selected blocks (``-1``: none);
    default every row of each block (``R = block``). Returns ``out (B, Hq, c, R, D)`` and
    ``lse (B, Hq, c, R)``, fp32 (float64 for float64 inputs; ``-inf`` and 0 for rows that
    attend nothing). Differentiable in q, k, v for the fixed selection, rows that attend
    nothing included (gradient 0).
    """
    bsz, hq, c = sel.blocks.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    t = plan.block
    device = q.device
    if rows is None:
        rows = sel.blocks.unsqueeze(-1) * t + torch.arange(t, device=device)
        rows = torch.where(rows < plan.nq, rows, -1)
    r = rows.shape[-1]
    exact_keys = (sel.exact_blocks.unsqueeze(-1) * t + torch.arange(t, device=device)).flatten(-2)
    exact_ok = (sel.exact_blocks >= 0).repeat_interleave(t, dim=-1) & (exact_keys < nk) & sel.active.unsqueeze(-1)
    kv_of = (torch.arange(hq, device=device) // group).view(1, hq, 1)
    b_of = torch.arange(bsz, device=device).view(bsz, 1, 1)
    g_idx, g_logw = block_columns(plan, sel)
    keys = torch.cat([torch.where(exact_ok, exact_keys, 0), g_idx], dim=-1)  # (B, Hq, c, S)
    logw = torch.cat([torch.where(exact_ok, 0.0, float("-inf")), g_logw], dim=-1)
    n_exact = exact_keys.shape[-1]
    lsh_len = int((lsh.hi - lsh.lo).max()) if lsh.hi.numel() else 0
    dtype = compute_dtype(q)
    outs, lses = [], []
    step = max(1, _PIECE // max(1, bsz * hq * r * (keys.shape[-1] + lsh_len)))
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        row = rows[:, :, c0:c1]  # (B, Hq, p, R)
        row_c = row.clamp(min=0)
        q_rows = q.gather(2, row_c.reshape(bsz, hq, -1, 1).expand(-1, -1, -1, q.shape[-1])).to(dtype)
        q_rows = q_rows.reshape(bsz, hq, c1 - c0, r, -1)
        key, w = keys[:, :, c0:c1], logw[:, :, c0:c1]
        lo = lsh.lo.gather(2, row_c.reshape(bsz, hq, -1)).reshape(row.shape)
        hi = torch.where(row >= 0, lsh.hi.gather(2, row_c.reshape(bsz, hq, -1)).reshape(row.shape), 0)

        # Listed keys (exact blocks, then gathered columns), shared by the block's rows.
        s = (q_rows @ _gather_rows(k, key, group).to(dtype).transpose(-1, -2)) * scale + w.unsqueeze(-2)
        if plan.causal:
            s = s.masked_fill(key.unsqueeze(-2) > (row + plan.offset).unsqueeze(-1), float("-inf"))
        g_slot = lsh.slot[b_of.unsqueeze(-1), kv_of.unsqueeze(-1), key[..., n_exact:]]  # (B, Hq, p, S_g)
        in_l = (g_slot.unsqueeze(-2) >= lo.unsqueeze(-1)) & (g_slot.unsqueeze(-2) < hi.unsqueeze(-1))
        s[..., n_exact:] = s[..., n_exact:].masked_fill(in_l, float("-inf"))
        s = s.masked_fill((row < 0).unsqueeze(-1), float("-inf"))
        out, lse = softmax_lse(s, _gather_rows(v, key, group).to(dtype))

        # The rows' own LSH blocks, minus keys of the block's exact blocks; one softmax with
        # the listed keys, through their log-sum-exp.
        if lsh_len:
            i = torch.arange(lsh_len, device=device)
            l_slot = (lo.unsqueeze(-1) + i).clamp(max=nk - 1)
            l_key = lsh.order[b_of.view(bsz, 1, 1, 1, 1), kv_of.view(1, hq, 1, 1, 1), l_slot]  # (B, Hq, p, R, L)
            in_e = ((l_key // t).unsqueeze(-1) == sel.exact_blocks[:, :, c0:c1].unsqueeze(3).unsqueeze(3)).any(-1)
            l_ok = (lo.unsqueeze(-1) + i < hi.unsqueeze(-1)) & ~in_e
            sl = (_gather_rows(k, l_key, group).to(dtype) @ q_rows.unsqueeze(-1)).squeeze(-1) * scale
            out_l, lse_l = softmax_lse(sl.masked_fill(~l_ok, float("-inf")).unsqueeze(-2),
                                       _gather_rows(v, l_key, group).to(dtype))
            out, lse = merge_lse(out, lse, out_l.squeeze(-2), lse_l.squeeze(-1))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
