"""Fused sortLSH hashing (mirrors :mod:`hyperattn.reference.lsh`): project, sign bits, Gray rank, sort keys.

:func:`lsh_buckets` is the reference's function in one launch (no fp32 copy of ``x``).

One pass over ``x`` gives every row its bucket (the Gray-code rank of its sign pattern
under the hyperplanes) and writes, for each launch group ``g`` of approximate pieces, the
integer sort key ``segment[g, pos] << r | bucket``. A stable sort of those keys along the
sequence sorts each piece's rows by bucket, in the piece's own slot range, for every
piece of the group at once: one sort per (group, head) instead of one per piece.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["lsh_buckets", "lsh_sort_keys"]

# Hyperplanes are read padded to this many columns (the smallest dot width; r <= 16 by config).
_R_PAD = 16


@triton.jit
def _lsh_keys_kernel(X, PROJ, SEG, KEYS, stride_xb, stride_xh, stride_xn, num_heads, n, num_groups, num_projs,
                     HEAD_DIM: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr, SEGMENTED: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, R_PAD)
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + offs_d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
    # [D, R_PAD]: the (D, r) hyperplanes, zero past r (no padded copy per call).
    proj = tl.load(PROJ + offs_d[:, None] * num_projs + offs_r[None, :], mask=(offs_r < num_projs)[None, :], other=0.0)
    # Three tf32 passes carry fp32-level accuracy at tensor-core speed (the plain fp32 dot is
    # FMA-bound here); a sign can only differ from the reference where x.P is within ~1e-6
    # relative of 0.
    y = tl.dot(x, proj, input_precision="tf32x3")  # [BLOCK, R_PAD]
    bits = (y > 0) & (offs_r[None, :] < num_projs)
    pattern = tl.sum(tl.where(bits, 1 << offs_r[None, :], 0), 1)
    # Inverse Gray code: rank = pattern ^ (pattern >> 1) ^ (pattern >> 2) ^ ...
    rank = pattern
    shift = pattern >> 1
    for _ in tl.static_range(R_PAD):
        rank = rank ^ shift
        shift = shift >> 1
    rows64 = rows.to(tl.int64)
    if SEGMENTED:
        for g in range(num_groups):
            seg = tl.load(SEG + g * n + rows64, mask=ok, other=0)
            tl.store(KEYS + (g * tl.num_programs(1) + bh) * n + rows64, (seg << num_projs) | rank, mask=ok)
    else:  # one group, every row in segment 0: the key is the bucket
        tl.store(KEYS + bh * n + rows64, rank, mask=ok)


def lsh_sort_keys(x: Tensor, proj: Tensor, segments: Tensor | None) -> Tensor:
    """Sort keys ``(G, B*H, N)`` int32 for ``x: (B, H, N, D)``, ``proj: (D, r)`` fp32, ``segments: (G, N)`` int32.

    ``key = segments[g, pos] << r | bucket(x[b, h, pos])`` with the bucket of
    :func:`hyperattn.reference.lsh.lsh_buckets`; ``segments`` must satisfy
    ``segments.max() < 2 ** (31 - r)``. ``None``: one group, every row in segment 0 (the
    bucket itself).

    Examples::

        >>> x = torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16)
        >>> proj = torch.randn(64, 7, device="cuda")
        >>> segments = torch.zeros(1, 1000, dtype=torch.int32, device="cuda")
        >>> lsh_sort_keys(x, proj, segments).shape  # bucket of each row, piece 0
        torch.Size([1, 2, 1000])
    """
    bsz, heads, n, dim = x.shape
    num_projs = proj.shape[1]
    proj = proj.to(device=x.device, dtype=torch.float32).contiguous()
    num_groups = segments.shape[0] if segments is not None else 1
    keys = torch.empty(num_groups, bsz * heads, n, device=x.device, dtype=torch.int32)
    block = 64
    grid = (triton.cdiv(n, block), bsz * heads)
    _lsh_keys_kernel[grid](x, proj, segments if segments is not None else keys, keys, x.stride(0), x.stride(1),
                           x.stride(2), heads, n, num_groups, num_projs, HEAD_DIM=dim, R_PAD=_R_PAD, BLOCK=block,
                           SEGMENTED=segments is not None, num_warps=4)
    return keys


def lsh_buckets(x: Tensor, proj: Tensor) -> Tensor:
    """:func:`hyperattn.reference.lsh.lsh_buckets` on CUDA in one launch: bucket ranks ``(B, H, N)`` int64.

    ``x: (B, H, N, D)``; ``proj: (D, r)`` fp32.
    """
    bsz, heads, n, _ = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    return lsh_sort_keys(x, proj, None)[0].reshape(bsz, heads, n).long()
