"""Driver of ``method="exact"``, and the exact attention every other driver falls back to."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.exact import attention_lse

__all__ = ["exact"]


def exact(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Exact attention (causal aligned bottom-right): SDPA's fastest backend on CUDA when no LSE is needed."""
    if q.is_cuda and not need_lse and q.dtype != torch.float64:
        group = q.shape[1] // k.shape[1]
        if not causal or q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=group > 1), None
        from torch.nn.attention.bias import causal_lower_right

        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                              scale=scale), None
    out, lse = attention_lse(q, k, v, scale, causal)
    return out.to(q.dtype), lse
