"""Entry point of the CUDA path for ``method="hyper"``: kernels when they apply, the reference otherwise.

:func:`hyper_attention_cuda` is what :func:`hyperattn.hyper_attention` calls for CUDA
tensors. The forward runs the Triton kernels; when autograd needs a gradient, a thin
``torch.autograd.Function`` saves only ``q, k, v`` and the call's seed, and its backward
recomputes through the PyTorch reference with the same draws, which gives the exact
gradient of the approximate function.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..config import HyperAttentionConfig
from ..reference.hyper import hyper_attention_reference

__all__ = ["hyper_attention_cuda", "kernel_supported"]

_HEAD_DIMS = (16, 32, 64, 128)


def _reference(q, k, v, scale, causal, config, seed, head_offset, total_heads):
    return hyper_attention_reference(q, k, v, scale=scale, causal=causal, block_size=config.block_size,
                                     sample_size=config.sample_size, num_projs=config.lsh_num_projs,
                                     min_seq_len=config.effective_min_seq_len, seed=seed, head_offset=head_offset,
                                     total_heads=total_heads)


def _supported(q: Tensor, *checks: tuple[bool, str]) -> str | None:
    # The checks every kernel path shares (CUDA, head dim, triton), with a path's own ones.
    if not q.is_cuda:
        return "the kernels need CUDA tensors"
    if q.shape[-1] not in _HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {_HEAD_DIMS}"
    for failed, reason in checks:
        if failed:
            return reason
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def kernel_supported(q: Tensor, config: HyperAttentionConfig) -> str | None:
    """``None`` when the Triton kernels can run this call, else the reason they cannot."""
    # Sort keys are (piece << r) | bucket in int32; pieces per launch are at most Nq / min_seq_len.
    pieces = q.shape[2] // max(1, config.effective_min_seq_len) + 2
    return _supported(q, (pieces.bit_length() + config.lsh_num_projs > 31,
                          "too many pieces per launch for 32-bit sort keys"))


class _HyperAttention(torch.autograd.Function):
    """Forward through the kernels; backward recomputes the reference with the same seed."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, config, seed, head_offset, total_heads):
        from .hyper import hyper_forward  # imported here: needs triton

        out, lse = hyper_forward(q, k, v, scale=scale, causal=causal, block_size=config.block_size,
                                 sample_size=config.sample_size, num_projs=config.lsh_num_projs,
                                 min_seq_len=config.effective_min_seq_len, seed=seed, head_offset=head_offset,
                                 total_heads=total_heads)
        ctx.save_for_backward(q, k, v)
        ctx.args = (scale, causal, config, seed, head_offset, total_heads)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v = ctx.saved_tensors
        inputs = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            out, lse = _reference(*inputs, *ctx.args)
        pairs = [(t, g.to(t.dtype)) for t, g in ((out, grad_out), (lse, grad_lse)) if g is not None]
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad([t for t, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        dq, dk, dv = (next(grads) if x.requires_grad else None for x in inputs)
        return dq, dk, dv, None, None, None, None, None, None


def hyper_attention_cuda(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                         config: HyperAttentionConfig, seed: int, head_offset: int = 0,
                         total_heads: int | None = None) -> tuple[Tensor, Tensor]:
    """The paper's method on validated CUDA inputs: ``out (B, Hq, Nq, D)`` in q's dtype, ``lse (B, Hq, Nq)`` fp32.

    Same function as :func:`hyperattn.reference.hyper.hyper_attention_reference` for the
    same ``seed`` (same plan, hyperplanes and samples), up to float rounding; a hash can
    differ only where a projection is within rounding of 0. ``head_offset``,
    ``total_heads``: q's heads are global heads ``[head_offset, head_offset + Hq)`` of
    ``total_heads`` (default: all of them). Head dims other than 16, 32, 64, 128 fall back
    to the reference with a warning. Differentiable.

    Examples::

        >>> import torch, hyperattn as ha
        >>> q = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(1, 2, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> cfg = ha.HyperAttentionConfig(method="hyper", seed=0)
        >>> ha.hyper_attention(q, k, v, causal=True, config=cfg).shape  # runs these kernels
        torch.Size([1, 8, 8192, 128])
    """
    reason = kernel_supported(q, config)
    if reason is not None:
        warnings.warn(f"hyper_attention: {reason}; running the PyTorch reference", stacklevel=3)
        return _reference(q, k, v, scale, causal, config, seed, head_offset, total_heads)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _HyperAttention.apply(q, k, v, scale, causal, config, seed, head_offset, total_heads)
