"""Driver of ``method="hyper"`` (the paper's HyperAttention): backend, autograd and stats.

On CUDA the Triton kernels run (:mod:`hyperattn.kernels.hyper`) where they apply; a thin
``torch.autograd.Function`` saves ``q, k, v, out``, the fp32 ``lse`` and the call's
selection (sorted orders and sample tables, O(N)), and its backward runs the backward
kernels on that selection (:func:`hyperattn.kernels.hyper.hyper_backward`): the exact
gradient of the approximate function, with nothing of size N x N or N x budget saved.
Elsewhere (CPU, float64, head dims the kernels lack) the PyTorch reference runs
(:func:`hyperattn.reference.hyper.hyper_attention_reference`), differentiable by autograd.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..config import HyperAttentionConfig
from ..reference.hyper import causal_plan, hyper_attention_reference, noncausal_plan, scored_pairs
from ..stats import AttentionStats

__all__ = ["run", "kernel_supported"]

_HEAD_DIMS = (16, 32, 64, 128)


def kernel_supported(q: Tensor, config: HyperAttentionConfig) -> str | None:
    """``None`` when the Triton kernels can run this call, else the reason they cannot."""
    if not q.is_cuda:
        return "the kernels need CUDA tensors"
    if q.shape[-1] not in _HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {_HEAD_DIMS}"
    # Sort keys are (piece << r) | bucket in int32; pieces per launch are at most Nq / min_seq_len.
    pieces = q.shape[2] // max(1, config.effective_min_seq_len) + 2
    if pieces.bit_length() + config.lsh_num_projs > 31:
        return "too many pieces per launch for 32-bit sort keys"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


class _HyperAttention(torch.autograd.Function):
    """Forward through the kernels; backward through the backward kernels, on the forward's selection."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, config, seed, head_offset, total_heads):
        from ..kernels.hyper import hyper_attend, hyper_select  # imported here: needs triton

        selection = hyper_select(q, k, causal=causal, block_size=config.block_size, sample_size=config.sample_size,
                                 num_projs=config.lsh_num_projs, min_seq_len=config.effective_min_seq_len, seed=seed,
                                 head_offset=head_offset, total_heads=total_heads)
        out, lse = hyper_attend(q, k, v, scale, selection)
        # Saved: inputs, output, fp32 lse and the selection (sorted orders, sample tables): O(N).
        ctx.save_for_backward(q, k, v, out, lse)
        # An unused lse gets no gradient (None, not zeros): the backward can then take the
        # exact pieces through SDPA's backward, which has no lse gradient input.
        ctx.set_materialize_grads(False)
        ctx.selection = selection
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from ..kernels.hyper import hyper_backward

        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = hyper_backward(q, k, v, out, lse, grad_out, grad_lse, ctx.scale, ctx.selection)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                None, None, None, None, None, None)


def run(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, config: HyperAttentionConfig, seed: int, *,
        need_lse: bool = True, head_offset: int = 0, total_heads: int | None = None, need_stats: bool = True
        ) -> tuple[Tensor, Tensor, AttentionStats]:
    """``method="hyper"`` on validated inputs: ``out (B, Hq, Nq, D)``, ``lse (B, Hq, Nq)`` and the stats.

    The kernels compute the reference's function for the same ``seed`` (same plan,
    hyperplanes and samples), up to float rounding; a hash can differ only where a
    projection is within rounding of 0. ``head_offset``, ``total_heads``: q's heads are
    global heads ``[head_offset, head_offset + Hq)`` of ``total_heads`` (default: all of
    them). On CUDA, head dims other than 16, 32, 64, 128 fall back to the reference with a
    warning. ``need_lse`` and ``need_stats`` change nothing here (both are always cheap).
    """
    nq, nk = q.shape[2], k.shape[2]
    min_len = config.effective_min_seq_len
    # float64 (gradcheck) runs the reference on every device, like the other methods.
    reason = "float64" if q.dtype == torch.float64 else kernel_supported(q, config)
    if reason is None:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out, lse = _HyperAttention.apply(q, k, v, scale, causal, config, seed, head_offset, total_heads)
    else:
        if q.is_cuda and reason != "float64":
            warnings.warn(f"hyper_attention: {reason}; running the PyTorch reference", stacklevel=4)
        out, lse = hyper_attention_reference(q, k, v, scale=scale, causal=causal, block_size=config.block_size,
                                             sample_size=config.sample_size, num_projs=config.lsh_num_projs,
                                             min_seq_len=min_len, seed=seed, head_offset=head_offset,
                                             total_heads=total_heads)
    plan = causal_plan(nq, nk, min_len) if causal else noncausal_plan(nq, nk, min_len)
    pairs = scored_pairs(plan, config.block_size, config.sample_size, nq, nk)
    nan = torch.full((q.shape[0], q.shape[1]), float("nan"), device=q.device)
    return out, lse, AttentionStats("hyper", pairs / nq, nan, torch.zeros_like(nan, dtype=torch.bool))
