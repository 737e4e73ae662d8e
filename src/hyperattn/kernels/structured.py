"""The structured method's attention step on CUDA: FlexAttention block-sparse passes merged by LSE.

Mirrors :mod:`hyperattn.reference.structured` function for function: :func:`attend` and
:func:`attend_rows` take the same arguments and compute the same function (up to float
rounding). :func:`attend` runs three FlexAttention passes over ``BlockMask``s built from
the selection (torch's block-sparse engine; measured side by side with our own Triton
kernels in ``benchmarks/NOTES.md``):

1. **block-sparse pass**: each query block over its exact blocks (window and top blocks),
   causal mask on the diagonal;
2. **gathered pass**: the gathered columns (sinks, heavy columns, residual samples) of
   every query block, copied into a block-diagonal key/value list with their log-weights
   added as a score bias, masked where a column lies in the row's LSH block;
3. **LSH pass**: queries and keys in bucket-sorted order, each sorted query block over the
   sorted key tiles its rows' ranges span, masked to each row's range minus its exact blocks;

then one log-sum-exp merge. :func:`attend_rows` (the guard's trials on a few probe rows)
is the reference's own gather code, which is cheap at that size.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..reference import structured as _ref
from ..reference.exact import merge_lse
from ..reference.selection import Lsh, Plan, Selection

__all__ = ["attend", "attend_rows", "supported"]

attend_rows = _ref.attend_rows

# FlexAttention's tile: the BlockMask's block size on both sides.
_TILE = 128

# Elements of the gathered key (and value) copies made at once; bounds their memory.
_GATHER_ELEMENTS = 1 << 31


def supported(q: Tensor) -> bool:
    """Whether :func:`attend` can run this call (CUDA, FlexAttention, a query block of one tile)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return q.is_cuda and q.shape[-1] in (16, 32, 64, 128, 256)


@functools.cache
def _flex(name: str):
    """A compiled FlexAttention per pass: each wrapper is its own code object, so each pass
    keeps its own compile cache (one shared cache hit dynamo's recompile limit across the
    passes and lengths of a benchmark and fell back to the unfused, quadratic-memory path)."""
    from torch.nn.attention.flex_attention import flex_attention

    def run(q, k, v, score_mod, block_mask, scale, enable_gqa):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=enable_gqa, return_lse=True)

    run.__code__ = run.__code__.replace(co_name=f"flex_{name}")
    return torch.compile(run, dynamic=False)


def _block_mask(num: Tensor, idx: Tensor, q_len: int, kv_len: int, mask_mod, full_num=None, full_idx=None):
    from torch.nn.attention.flex_attention import BlockMask

    full = {} if full_num is None else {"full_kv_num_blocks": full_num.int().contiguous(),
                                          "full_kv_indices": full_idx.int().contiguous()}
    return BlockMask.from_kv_blocks(num.int().contiguous(), idx.int().contiguous(), **full, BLOCK_SIZE=_TILE,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len), compute_q_blocks=False)


def _run(name, q, k, v, scale, block_mask, score_mod=None, gqa=False):
    return _flex(name)(q, k, v, score_mod, block_mask, scale, gqa)


def _packed(indices: Tensor) -> tuple[Tensor, Tensor]:
    """Counts and indices with the valid (``>= 0``) entries first, ascending."""
    big = torch.iinfo(torch.int32).max
    ordered = torch.sort(torch.where(indices >= 0, indices, big), dim=-1).values
    return (indices >= 0).sum(-1), torch.where(ordered == big, 0, ordered)


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh
           ) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.structured.attend` on FlexAttention (same contract)."""
    if plan.block != _TILE:
        out, lse = _ref.attend(q, k, v, scale, plan, sel, lsh)
        return out, lse
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    device = q.device
    first, nqb, nkb = plan.first, plan.nqb, plan.nkb
    offset = plan.offset
    causal = plan.causal
    lo, hi = lsh.lo.int(), lsh.hi.int()

    # 1. Block-sparse pass over E_j: blocks the diagonal (or the keys' end) cuts are partial
    # (mask evaluated), the others full. The mask is the whole definition (E_j and causal),
    # as FlexAttention's eager path applies it to every score.
    exact_blocks = torch.nn.functional.pad(sel.exact_blocks, (0, 0, first, 0), value=-1)  # (B, Hq, nqb, E)
    # Exact blocks of every query block as a bitmap, to drop them from the LSH ranges.
    words = math.ceil(nkb / 32)
    bits = torch.zeros(bsz, hq, nqb, words * 32 + 1, dtype=torch.bool, device=device)
    bits.scatter_(-1, torch.where(exact_blocks >= 0, exact_blocks, words * 32).long(), True)
    bits = (bits[..., :-1].reshape(bsz, hq, nqb, words, 32).int() << torch.arange(32, device=device, dtype=torch.int32)).sum(
        -1, dtype=torch.int32)
    q_start = torch.arange(nqb, device=device).view(1, 1, nqb, 1) * _TILE
    block_end = (exact_blocks + 1) * _TILE - 1  # last key of each block
    cut = (block_end >= nk) | ((block_end > q_start + offset) if causal else False)
    num, idx = _packed(torch.where(cut, exact_blocks, -1))
    full_num, full_idx = _packed(torch.where(cut, -1, exact_blocks))

    def exact_mask(b, h, q_idx, kv_idx):
        kb = kv_idx // _TILE
        word = bits[b, h, q_idx // _TILE, kb >> 5]
        keep = (kv_idx < nk) & (((word >> (kb & 31)) & 1) == 1)
        return keep & (q_idx + offset >= kv_idx) if causal else keep

    out1, lse1 = _run("blocks", q, k, v, scale, _block_mask(num, idx, nq, nk, exact_mask, full_num, full_idx), gqa=hq != hkv)

    # 2. Gathered pass: each query block's listed columns, block-diagonal.
    width = sel.gather_idx.shape[-1]
    tiles = max(1, math.ceil(width / _TILE))
    pad = tiles * _TILE - width
    g_idx = torch.nn.functional.pad(sel.gather_idx, (0, pad))
    g_logw = torch.nn.functional.pad(sel.gather_logw, (0, pad), value=float("-inf"))
    c = g_idx.shape[2]
    out2 = torch.zeros_like(q)
    lse2 = torch.full((bsz, hq, nq), float("-inf"), device=device)
    per_head = c * tiles * _TILE * dim
    group = hq // hkv
    # Whole KV groups per step, so the columns gather straight from k and v (no copy per head).
    step = group * max(1, min(hkv, _GATHER_ELEMENTS // max(1, bsz * per_head * group)))
    j = torch.arange(nqb, device=device)
    g_num = torch.where(j >= first, tiles, 0).view(1, 1, nqb).expand(bsz, -1, -1)
    g_ind = ((j - first).clamp(min=0) * tiles).view(nqb, 1) + torch.arange(tiles, device=device)
    for h0 in range(0, hq, step):
        h1 = min(hq, h0 + step)
        heads = torch.arange(h0, h1, device=device)
        gi = g_idx[:, h0:h1].reshape(bsz, h1 - h0, -1)
        kv0, kv1 = h0 // group, h1 // group
        kv_rows = gi.reshape(bsz, kv1 - kv0, -1).unsqueeze(-1).expand(-1, -1, -1, dim)
        kg = k[:, kv0:kv1].gather(2, kv_rows).reshape(bsz, h1 - h0, -1, dim)
        vg = v[:, kv0:kv1].gather(2, kv_rows).reshape(bsz, h1 - h0, -1, dim)
        logw = g_logw[:, h0:h1].reshape(bsz, h1 - h0, -1).contiguous()
        b_ix = torch.arange(bsz, device=device).view(-1, 1, 1)
        slot = lsh.slot[b_ix, (heads // group).view(1, -1, 1), gi].int()  # bucket-sorted slot of each column
        lo_h, hi_h = lo[:, h0:h1].contiguous(), hi[:, h0:h1].contiguous()

        def weight(score, b, h, q_idx, kv_idx):
            return score + logw[b, h, kv_idx]

        def listed(b, h, q_idx, kv_idx):
            s = slot[b, h, kv_idx]
            own = kv_idx // (tiles * _TILE) == q_idx // _TILE - first  # the block-diagonal list
            return own & (logw[b, h, kv_idx] > float("-inf")) & ((s < lo_h[b, h, q_idx]) | (s >= hi_h[b, h, q_idx]))

        mask = _block_mask(g_num.expand(bsz, h1 - h0, -1), g_ind.expand(bsz, h1 - h0, -1, -1), nq, gi.shape[-1],
                           listed)
        o, l = _run("gathered", q[:, h0:h1], kg, vg, scale, mask, score_mod=weight)
        out2[:, h0:h1], lse2[:, h0:h1] = o, l

    # 3. LSH pass in bucket-sorted order.
    q_order = lsh.q_order
    q_sorted = q.gather(2, q_order.unsqueeze(-1).expand(-1, -1, -1, dim))
    k_sorted = k.gather(2, lsh.order.unsqueeze(-1).expand(-1, -1, -1, dim))
    v_sorted = v.gather(2, lsh.order.unsqueeze(-1).expand(-1, -1, -1, dim))
    lo_s, hi_s = lo.gather(2, q_order), hi.gather(2, q_order)
    row_block = (q_order // _TILE).int()
    pad_rows = nqb * _TILE - nq
    busy = lo_s < hi_s
    t_lo = torch.nn.functional.pad(torch.where(busy, lo_s, 2 ** 30), (0, pad_rows), value=2 ** 30)
    t_hi = torch.nn.functional.pad(torch.where(busy, hi_s, 0), (0, pad_rows), value=0)
    first_tile = t_lo.reshape(bsz, hq, nqb, _TILE).amin(-1) // _TILE
    last_tile = (t_hi.reshape(bsz, hq, nqb, _TILE).amax(-1) - 1) // _TILE
    span = torch.clamp(last_tile - first_tile + 1, min=0, max=min(nkb, _ref_tiles()))
    l_ind = (first_tile.clamp(max=nkb - 1).unsqueeze(-1) + torch.arange(span.max().clamp(min=1).item(), device=device))
    l_ind = torch.minimum(l_ind, torch.tensor(nkb - 1, device=device))
    key_block = (lsh.order // _TILE).int()

    def in_range(b, h, q_idx, kv_idx):
        kb = key_block[b, h // group, kv_idx]
        word = bits[b, h, row_block[b, h, q_idx], kb >> 5]
        return (kv_idx >= lo_s[b, h, q_idx]) & (kv_idx < hi_s[b, h, q_idx]) & (((word >> (kb & 31)) & 1) == 0)

    mask = _block_mask(span, l_ind, nq, nk, in_range)
    o3, l3 = _run("lsh", q_sorted, k_sorted, v_sorted, scale, mask, gqa=hq != hkv)
    inverse = torch.empty_like(q_order).scatter_(-1, q_order, torch.arange(nq, device=device).expand_as(q_order))
    out3 = o3.gather(2, inverse.unsqueeze(-1).expand(-1, -1, -1, dim))
    lse3 = l3.gather(2, inverse)

    out, lse = merge_lse(out1.float(), lse1, out2.float(), lse2)
    out, lse = merge_lse(out, lse, out3.float(), lse3)
    rows = first * plan.block
    return out[:, :, rows:], lse[:, :, rows:]


def _ref_tiles() -> int:
    from ..reference.selection import LSH_TILES

    return LSH_TILES
