"""Entry point of the CUDA path for ``method="hyper"``: kernels when they apply, the reference otherwise.

:func:`hyper_attention_cuda` is what :func:`hyperattn.hyper_attention` calls for CUDA
tensors. The forward runs the Triton kernels; a thin ``torch.autograd.Function`` saves
``q, k, v, out``, the fp32 ``lse`` and the call's selection (sorted orders and sample
tables, O(N)), and its backward runs the backward kernels on that selection
(:func:`hyperattn.kernels.hyper.hyper_backward`): the exact gradient of the approximate
function, with nothing of size N x N or N x budget saved.
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
    """Forward through the kernels; backward through the backward kernels, on the forward's selection."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, config, seed, head_offset, total_heads):
        from .hyper import hyper_attend, hyper_select  # imported here: needs triton

        selection = hyper_select(q, k, causal=causal, block_size=config.block_size, sample_size=config.sample_size,
                                 num_projs=config.lsh_num_projs, min_seq_len=config.effective_min_seq_len, seed=seed,
                                 head_offset=head_offset, total_heads=total_heads)
        out, lse = hyper_attend(q, k, v, scale, selection)
        # Saved: inputs, output, fp32 lse and the selection (sorted orders, sample tables): O(N).
        ctx.save_for_backward(q, k, v, out, lse)
        # An unused lse gets no gradient (None, not zeros): the backward can then take the
        # exact pieces through SDPA's flash backward, which has no lse gradient input.
        ctx.set_materialize_grads(False)
        ctx.selection = selection
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from .hyper import hyper_backward

        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = hyper_backward(q, k, v, out, lse, grad_out, grad_lse, ctx.scale, ctx.selection)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                None, None, None, None, None, None)


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
