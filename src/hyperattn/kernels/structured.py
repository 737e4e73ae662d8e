"""The structured method's attention step on CUDA: Triton kernels, or FlexAttention block-sparse passes merged by LSE.

Mirrors :mod:`hyperattn.reference.structured` function for function: :func:`attend` and
:func:`attend_rows` take the same arguments and compute the same function (up to float
rounding). Two engines, measured side by side in ``benchmarks/NOTES.md``: the Triton
kernels of :mod:`hyperattn.kernels.sparse` (two launches forward, five backward; the one
:func:`attend` runs, faster both ways) and :func:`attend_flex`, three FlexAttention passes
over ``BlockMask``s built from the selection (torch's block-sparse engine, differentiable),
kept as the stock yardstick:

1. **block-sparse pass**: each query block over its exact blocks (window and top blocks),
   causal mask on the diagonal only;
2. **gathered pass**: each query block over its chunk's gathered columns (sinks, heavy
   columns, residual samples), copied once per (KV head, chunk), with their log-weights as
   a score bias, masked outside the block's complement and inside the row's LSH block;
3. **LSH pass**: queries and keys in bucket-sorted order, each sorted query block over the
   sorted key tiles its rows' ranges span, masked to each row's range minus its exact blocks;

then one log-sum-exp merge. :func:`attend_rows` (the guard's trials on a few probe rows)
is one Triton launch as well.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..reference import structured as _ref
from ..reference.exact import merge_lse
from ..reference.selection import LSH_TILES, Lsh, Plan, Selection, sorted_spans

__all__ = ["attend", "attend_rows", "supported", "TILE"]


#: The query block both engines take (FlexAttention's BlockMask tile on both sides; the
#: Triton kernels' block); other query blocks run the reference.
TILE = 128


def supported(q: Tensor) -> bool:
    """Whether :func:`attend` can run this call (CUDA, FlexAttention, a query block of one tile)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return q.is_cuda and q.shape[-1] in (16, 32, 64, 128, 256)


@functools.cache
def _flex(name: str):
    """A compiled FlexAttention per pass (its own code object and compile cache entries)."""
    from torch.nn.attention.flex_attention import flex_attention

    def run(q, k, v, score_mod, block_mask, scale, enable_gqa, kernel_options):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=enable_gqa, return_lse=True, kernel_options=kernel_options)

    run.__code__ = run.__code__.replace(co_name=f"flex_{name}")
    # Compiled functions share dynamo's recompile budget (8 by default): the passes and a
    # few lengths exceed it, after which FlexAttention silently runs its
    # unfused, quadratic-memory path. Raise it (only ever upwards).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(run, dynamic=False)


def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _block_mask(num: Tensor, idx: Tensor, q_len: int, kv_len: int, mask_mod, full_num=None, full_idx=None,
                backward: bool = False):
    """A ``BlockMask`` of ``num`` listed key tiles per query tile (and ``full_*``: tiles without a mask).

    Forward-only masks keep the lists compact; under autograd the lists are padded to every
    key tile, as ``BlockMask.from_kv_blocks`` needs when it builds the transposed lists of
    the backward pass (``compute_q_blocks``).
    """
    from torch.nn.attention.flex_attention import BlockMask

    tiles = math.ceil(kv_len / TILE)

    def widen(x):
        x = x.int()
        return torch.nn.functional.pad(x, (0, tiles - x.shape[-1])) if backward and x.shape[-1] < tiles else x

    full = {} if full_num is None else {"full_kv_num_blocks": full_num.int().contiguous(),
                                          "full_kv_indices": widen(full_idx).contiguous()}
    return BlockMask.from_kv_blocks(num.int().contiguous(), widen(idx).contiguous(), **full, BLOCK_SIZE=TILE,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len), compute_q_blocks=backward)


# Tile settings tried in order: FlexAttention's own choice, then smaller tiles and fewer
# stages for masks whose captured tables leave no room in shared memory (seen for the
# merged pass at D=128 bf16: "No valid triton configs").
_OPTIONS = (None, {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1, "num_warps": 4})
_WORKING: dict = {}


def _run(name, q, k, v, scale, block_mask, score_mod=None, gqa=False):
    key = (name, q.shape[-1], q.dtype)
    for options in _OPTIONS[_WORKING.get(key, 0):]:
        try:
            result = _flex(name)(q, k, v, score_mod, block_mask, scale, gqa, options)
        except RuntimeError as exc:
            if "No valid triton configs" not in str(exc) or options is _OPTIONS[-1]:
                raise
            _WORKING[key] = _OPTIONS.index(options) + 1
            continue
        return result


def _packed(indices: Tensor) -> tuple[Tensor, Tensor]:
    """Counts and indices with the valid (``>= 0``) entries first, ascending."""
    big = torch.iinfo(torch.int32).max
    ordered = torch.sort(torch.where(indices >= 0, indices, big), dim=-1).values
    return (indices >= 0).sum(-1), torch.where(ordered == big, 0, ordered)


def _exact_bits(plan: Plan, sel: Selection) -> Tensor:
    """Each query block's exact blocks as a bit set, ``(B, Hq, nqb, ceil(nkb / 32))`` int32."""
    bsz, hq = sel.blocks.shape[:2]
    nqb, nkb, first = plan.nqb, plan.nkb, plan.first
    exact_blocks = torch.nn.functional.pad(sel.exact_blocks, (0, 0, first, 0), value=-1)  # (B, Hq, nqb, E)
    words = math.ceil(nkb / 32)
    bits = torch.zeros(bsz, hq, nqb, words * 32 + 1, dtype=torch.bool, device=exact_blocks.device)
    bits.scatter_(-1, torch.where(exact_blocks >= 0, exact_blocks, words * 32).long(), True)
    return (bits[..., :-1].reshape(bsz, hq, nqb, words, 32).int()
            << torch.arange(32, device=bits.device, dtype=torch.int32)).sum(-1, dtype=torch.int32)


def _in_bits(bits: Tensor):
    def bit(b, h, j, kb):
        return ((bits[b, h, j, kb >> 5] >> (kb & 31)) & 1) == 1
    return bit


def block_pass(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, bits: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Every query block over its exact blocks: full blocks unmasked, the diagonal's and the keys' end masked."""
    nq, nk = q.shape[2], k.shape[2]
    device = q.device
    offset, causal = plan.offset, plan.causal
    bit = _in_bits(bits)
    exact_blocks = torch.nn.functional.pad(sel.exact_blocks, (0, 0, plan.first, 0), value=-1)
    q_start = torch.arange(plan.nqb, device=device).view(1, 1, plan.nqb, 1) * TILE
    block_end = (exact_blocks + 1) * TILE - 1  # last key of each block
    cut = (block_end >= nk) | ((block_end > q_start + offset) if causal else False)
    num, idx = _packed(torch.where(cut, exact_blocks, -1))
    full_num, full_idx = _packed(torch.where(cut, -1, exact_blocks))

    # The mask is the whole definition, as FlexAttention's eager path applies it to every score.
    def exact_mask(b, h, q_idx, kv_idx):
        keep = (kv_idx < nk) & bit(b, h, q_idx // TILE, kv_idx // TILE)
        return keep & (q_idx + offset >= kv_idx) if causal else keep

    return _run("blocks", q, k, v, scale, _block_mask(num, idx, nq, nk, exact_mask, full_num, full_idx,
                                                               _needs_grad(q, k, v)),
                gqa=q.shape[1] != k.shape[1])


def gathered_pass(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh
                  ) -> tuple[Tensor, Tensor]:
    """Every query block over its chunk's gathered columns, copied once per (KV head, chunk).

    Query block ``j`` takes its chunk's tiles; which columns it may use (in ``C_j``) is one
    table lookup; the row's LSH range is masked per row; log-weights are a score bias.
    """
    bsz, hq, nq, dim = q.shape
    hkv = k.shape[1]
    device = q.device
    nqb, first, group = plan.nqb, plan.first, hq // hkv
    lo, hi = lsh.lo.int(), lsh.hi.int()
    width = sel.gather_idx.shape[-1]
    tiles = max(1, math.ceil(width / TILE))
    s_pad = tiles * TILE
    nc = sel.gather_idx.shape[2]
    g_idx = torch.nn.functional.pad(sel.gather_idx, (0, s_pad - width))  # (B, Hkv, C, S_pad)
    g_logw = torch.nn.functional.pad(sel.gather_logw, (0, s_pad - width), value=float("-inf"))
    rows = g_idx.reshape(bsz, hkv, nc * s_pad).unsqueeze(-1).expand(-1, -1, -1, dim)
    k_g, v_g = k.gather(2, rows), v.gather(2, rows)
    b_ix = torch.arange(bsz, device=device).view(-1, 1, 1)
    g_slot = lsh.slot[b_ix, torch.arange(hkv, device=device).view(1, -1, 1), g_idx.reshape(bsz, hkv, -1)].int()
    chunk_of = torch.arange(nqb, device=device) // plan.chunk_blocks
    # Which of its chunk's columns each block may use: the reference's own table, padded to
    # every query block (those before plan.first use none) and to whole tiles.
    _, own_logw = _ref.block_columns(plan, sel)
    own_logw = torch.nn.functional.pad(own_logw, (0, s_pad - width, first, 0), value=float("-inf"))
    usable = torch.isfinite(own_logw).reshape(bsz, hq, nqb * s_pad)
    g_logw = g_logw.reshape(bsz, hkv, nc * s_pad).contiguous()
    active = torch.nn.functional.pad(sel.active, (first, 0), value=False)  # (B, Hq, nqb)
    g_num = torch.where(active, tiles, 0)
    g_ind = (chunk_of * tiles).view(nqb, 1) + torch.arange(tiles, device=device)

    def weight(score, b, h, q_idx, kv_idx):
        return score + g_logw[b, h // group, kv_idx]

    def listed(b, h, q_idx, kv_idx):
        j = q_idx // TILE
        s = g_slot[b, h // group, kv_idx]
        mine = kv_idx // s_pad == chunk_of[j]
        ok = usable[b, h, j * s_pad + kv_idx % s_pad]
        return mine & ok & ((s < lo[b, h, q_idx]) | (s >= hi[b, h, q_idx]))

    mask = _block_mask(g_num, g_ind.expand(bsz, hq, -1, -1), nq, nc * s_pad, listed, backward=_needs_grad(q, k, v))
    return _run("gathered", q, k_g, v_g, scale, mask, score_mod=weight, gqa=hq != hkv)


def lsh_pass(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, lsh: Lsh, bits: Tensor
             ) -> tuple[Tensor, Tensor]:
    """Queries and keys in bucket-sorted order, each sorted block over the key tiles its rows span.

    Each KV head's query heads are one sequence of ``G * Nq`` rows here (sorted together,
    :class:`hyperattn.reference.selection.Lsh`). Rows are masked to their range minus their
    block's exact blocks; returns rows in the original order.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    device = q.device
    nkb, group = plan.nkb, hq // hkv
    n_sorted = group * nq
    bit = _in_bits(bits)
    q_order = lsh.q_order
    q_sorted = q.reshape(bsz, hkv, n_sorted, dim).gather(2, q_order.unsqueeze(-1).expand(-1, -1, -1, dim))
    k_sorted = k.gather(2, lsh.order.unsqueeze(-1).expand(-1, -1, -1, dim))
    v_sorted = v.gather(2, lsh.order.unsqueeze(-1).expand(-1, -1, -1, dim))
    lo_s, hi_s, start, end = sorted_spans(q_order, lsh.lo.int(), lsh.hi.int(), TILE, nk)
    head = (q_order // nq).int()  # each sorted row's head within the group
    row_block = ((q_order % nq) // TILE).int()
    # A tile with no range: start nk, end 0, so a span of zero tiles.
    first_tile = start // TILE
    last_tile = (end - 1) // TILE
    width = min(nkb, LSH_TILES)
    span = torch.clamp(last_tile - first_tile + 1, min=0, max=width)
    l_ind = torch.clamp(first_tile.clamp(max=nkb - 1).unsqueeze(-1) + torch.arange(width, device=device), max=nkb - 1)
    key_block = (lsh.order // TILE).int()

    def in_range(b, h, q_idx, kv_idx):  # h: the KV head
        kb = key_block[b, h, kv_idx]
        in_exact = bit(b, h * group + head[b, h, q_idx], row_block[b, h, q_idx], kb)
        return (kv_idx >= lo_s[b, h, q_idx]) & (kv_idx < hi_s[b, h, q_idx]) & ~in_exact

    mask = _block_mask(span, l_ind, n_sorted, nk, in_range, backward=_needs_grad(q, k, v))
    o3, l3 = _run("lsh", q_sorted, k_sorted, v_sorted, scale, mask)
    inverse = torch.empty_like(q_order).scatter_(
        -1, q_order, torch.arange(n_sorted, device=device).expand_as(q_order))
    out = o3.gather(2, inverse.unsqueeze(-1).expand(-1, -1, -1, dim)).reshape(bsz, hq, nq, dim)
    return out, l3.gather(2, inverse).reshape(bsz, hq, nq)


def attend_flex(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh
                ) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.structured.attend` on FlexAttention's passes (differentiable)."""
    bits = _exact_bits(plan, sel)
    out1, lse1 = block_pass(q, k, v, scale, plan, sel, bits)
    out2, lse2 = gathered_pass(q, k, v, scale, plan, sel, lsh)
    out3, lse3 = lsh_pass(q, k, v, scale, plan, lsh, bits)
    out, lse = merge_lse(out1.float(), lse1, out2.float(), lse2)
    out, lse = merge_lse(out, lse, out3.float(), lse3)
    rows0 = plan.first * plan.block
    return out[:, :, rows0:], lse[:, :, rows0:]


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh
           ) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.structured.attend` on CUDA (same contract; ``out`` in q's dtype).

    The Triton engine (:func:`hyperattn.kernels.sparse.attend_triton`, forward and
    backward), measured faster than FlexAttention's passes both ways (``benchmarks/NOTES.md``).
    """
    if plan.block != TILE:
        return _ref.attend(q, k, v, scale, plan, sel, lsh)
    from .sparse import attend_triton

    return attend_triton(q, k, v, scale, plan, sel, lsh)


def attend_rows(q: Tensor, k: Tensor, v: Tensor, scale: float, plan: Plan, sel: Selection, lsh: Lsh,
                rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`hyperattn.reference.structured.attend_rows` on CUDA (the guard's trials on probe rows).

    Given rows without autograd: one Triton launch
    (:func:`hyperattn.kernels.sparse.attend_rows_triton`); otherwise the reference's gather
    code, which is differentiable.
    """
    if rows is None or _needs_grad(q, k, v) or plan.block != TILE or rows.shape[-1] > 64:
        return _ref.attend_rows(q, k, v, scale, plan, sel, lsh, rows)
    from .sparse import attend_rows_triton

    return attend_rows_triton(q, k, v, scale, plan, sel, lsh, rows)
