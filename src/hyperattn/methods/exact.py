"""Driver of ``method="exact"``, and the exact attention every other driver falls back to."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.exact import attention_lse, exact_pairs
from ..stats import AttentionStats

__all__ = ["run", "exact"]


def exact(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Exact attention (causal aligned bottom-right): SDPA's fastest backend on CUDA when no LSE is needed."""
    if q.is_cuda and not need_lse and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mask = None
        if causal and q.shape[2] != k.shape[2]:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(q.shape[2], k.shape[2])
        # cuDNN first: the fastest backend measured on H100/H200. It takes grouped K/V as they
        # are (enable_gqa; on an H200 at 4k as fast as on repeated K/V, without the copy).
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        with sdpa_kernel(order, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                 scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return out, None
    out, lse = attention_lse(q, k, v, scale, causal)
    return out.to(q.dtype), lse


def run(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, config, seed: int, *, need_lse: bool = True,
        head_offset: int = 0, total_heads: int | None = None, need_stats: bool = True
        ) -> tuple[Tensor, Tensor | None, AttentionStats]:
    """``method="exact"`` on validated inputs (:func:`exact`; the stats count every visible key)."""
    out, lse = exact(q, k, v, scale, causal, need_lse)
    zeros = torch.zeros(q.shape[0], q.shape[1], device=q.device)
    stats = AttentionStats("exact", exact_pairs(0, q.shape[2], q.shape[2], k.shape[2], causal) / q.shape[2], zeros,
                           torch.ones_like(zeros, dtype=torch.bool))
    return out, lse, stats
