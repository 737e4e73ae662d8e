"""Driver of the peer patterns and the oracle (``"streaming"``, ``"vertical_slash"``, ``"block_topk"``, ``"oracle_topk"``).

They have no kernels: their PyTorch references (:mod:`hyperattn.reference.peers`) run on
every device, in chunks of heads whose dense selection masks fit a memory bound. They
exist for side-by-side quality measurements, not for speed.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..stats import AttentionStats

__all__ = ["run"]

# Keys past which a peer warns on CUDA: its PyTorch reference takes seconds per call there.
_SLOW_ON_CUDA = 16384

# Elements of one (B, Hq, Nq/64, Nk) selection mask a call may build; larger calls run in
# chunks of heads so memory stays bounded. (The structured method works on index lists in
# chunks of query blocks and needs no such split.)
_MASK_ELEMENTS = 1 << 27


def run(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, config, seed: int, *, need_lse: bool = True,
        head_offset: int = 0, total_heads: int | None = None, need_stats: bool = True
        ) -> tuple[Tensor, Tensor, AttentionStats]:
    """``config.method``'s pattern on validated inputs, in chunks of (batch, heads) whose masks fit ``_MASK_ELEMENTS``.

    Chunks are whole KV-head groups where they fit, else single query heads; each chunk
    draws from its own seed derived from ``seed``, so results stay reproducible and the
    same on every device. Calls that fit run whole, unchanged. The peers draw per call,
    not per global head (``head_offset``, ``total_heads`` unused): callers pass them all heads.
    """
    from ..reference import peers

    runner = peers.RUNNERS[config.method]
    bsz, hq, nq, _ = q.shape
    if q.is_cuda and k.shape[2] > _SLOW_ON_CUDA:
        warnings.warn(f"hyper_attention: method={config.method!r} has no GPU kernel yet and runs its PyTorch "
                      f"reference ({k.shape[2]} keys: seconds per call); method='hyper' runs Triton kernels",
                      stacklevel=4)
    hkv = k.shape[1]
    group = hq // hkv
    fit = max(1, _MASK_ELEMENTS // (math.ceil(nq / 64) * k.shape[2]))
    if bsz * hq <= fit:
        return runner(q, k, v, scale, causal, config, seed)
    step = group * min(hkv, fit // group) if fit >= group else max(d for d in range(1, group + 1)
                                                                    if group % d == 0 and d <= fit)
    outs, lses, stats = [], [], []
    for b in range(bsz):
        for h0 in range(0, hq, step):
            kv = slice(h0 // group, (h0 + step - 1) // group + 1)
            chunk_seed = (seed + 1_000_003 * len(stats)) % 2**62
            o, l, st = runner(q[b:b + 1, h0:h0 + step], k[b:b + 1, kv], v[b:b + 1, kv], scale, causal, config,
                              chunk_seed)
            outs.append(o)
            lses.append(l)
            stats.append(st)
    out = torch.cat(outs, dim=1).reshape(bsz, hq, *outs[0].shape[2:])
    lse = torch.cat(lses, dim=1).reshape(bsz, hq, nq)
    merged = AttentionStats(
        stats[0].method,
        sum(st.keys_per_query for st in stats) / len(stats),
        torch.cat([st.est_error for st in stats], dim=1).reshape(bsz, hq),
        torch.cat([st.exact_heads for st in stats], dim=1).reshape(bsz, hq),
    )
    return out, lse, merged
