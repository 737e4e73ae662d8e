"""Public attention functions: input validation, method dispatch, stats.

Shape legend: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads with
``Hq % Hkv == 0`` (GQA/MQA; K/V are never repeated in memory), ``Nq``/``Nk`` query/key
lengths, ``D`` head dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import HyperAttentionConfig
from .stats import AttentionStats
from .reference.exact import attention_lse

__all__ = ["hyper_attention", "exact_attention", "AttentionStats"]

# float64 runs the PyTorch reference on every device (no kernel takes it): it exists so that
# torch.autograd.gradcheck can run on the function users call.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DEFAULT_CONFIG = HyperAttentionConfig()


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _shape_only(x: Tensor) -> bool:
    """Meta or fake tensors (shape propagation, tracing): no values to check or compute with."""
    from torch._subclasses.fake_tensor import is_fake

    return x.is_meta or is_fake(x)


def _lse_dtype(x: Tensor) -> torch.dtype:
    """LSE is fp32, or float64 for float64 inputs (so gradcheck sees it at full precision)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shape_only_result(q: Tensor, v: Tensor, method: str):
    """Outputs of the right shapes, dtypes and device for :func:`_shape_only` inputs, nothing computed."""
    bsz, hq, nq, _ = q.shape
    heads = q.new_empty((bsz, hq), dtype=torch.float32)
    stats = AttentionStats(method, float("nan"), heads, heads.to(torch.bool))
    return q.new_empty((bsz, hq, nq, v.shape[-1])), q.new_empty((bsz, hq, nq), dtype=_lse_dtype(q)), stats


def _check_inputs(q, k, v, causal, scale, config, check_finite: bool) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor (B, Hq, Nq, D), got shape {_shape(q)}")
    bsz, hq, nq, dim = q.shape
    if k.dim() != 4:
        raise ValueError(f"k: expected a 4-D tensor (B, Hkv, Nk, D), got shape {_shape(k)}")
    if v.dim() != 4:
        raise ValueError(f"v: expected a 4-D tensor (B, Hkv, Nk, D), got shape {_shape(v)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q: expected dtype float32, bfloat16, float16 or float64, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (q's), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (q's), got {x.device}")
    if min(q.shape) == 0:
        raise ValueError(f"q: expected a non-empty tensor (B, Hq, Nq, D), got shape {_shape(q)}")
    if k.shape[0] != bsz or k.shape[3] != dim or min(k.shape) == 0:
        raise ValueError(f"k: expected (B, Hkv, Nk, D) with B == q's {bsz}, D == q's {dim} and no empty "
                         f"dimension, got {_shape(k)}")
    if hq % k.shape[1] != 0:
        raise ValueError(f"k: expected a head count Hkv that divides q's Hq = {hq}, got Hkv = {k.shape[1]}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the same shape as k {_shape(k)}, got {_shape(v)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite float > 0 or None, got {scale!r}")
    if config is not None and not isinstance(config, HyperAttentionConfig):
        raise TypeError(f"config: expected a HyperAttentionConfig or None, got {type(config).__name__}")
    if check_finite:
        _check_finite(q, k, v)


def _check_finite(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not _shape_only(q):
        # One max-abs reduction per tensor (NaN propagates, Inf stays Inf) and a single host
        # sync for all three, instead of an elementwise isfinite pass and a sync per tensor;
        # the verdict is taken on the host (isfinite on the device is four more launches).
        # (Peaks in fp32, or float64 for float64 inputs, whose finite values may exceed fp32's range.)
        wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        peaks = torch.stack([torch.linalg.vector_norm(x, ord=float("inf"), dtype=wide) for x in (q, k, v)])
        for name, peak in zip(("q", "k", "v"), peaks.tolist()):
            if not math.isfinite(peak):
                raise ValueError(f"{name}: expected finite values, found NaN or Inf "
                                 "(pass config=HyperAttentionConfig(check_finite=False) to skip this check)")


def _driver(method: str) -> Callable:
    """The driver of ``method`` (:mod:`hyperattn.methods`), imported on first use (the CUDA paths need triton)."""
    from .methods import exact, hyper, peers, structured

    return {"structured": structured.run, "hyper": hyper.run, "exact": exact.run}.get(method, peers.run)


def hyper_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
                    config: HyperAttentionConfig | None = None, *, return_lse: bool = False,
                    return_stats: bool = False):
    """Approximate attention in near-linear time.

    Args:
        q: ``(B, Hq, Nq, D)`` queries, float32/bfloat16/float16, or float64 (computed by
            the PyTorch reference in float64 on every device: slow, for
            ``torch.autograd.gradcheck``).
        k: ``(B, Hkv, Nk, D)`` keys, same dtype and device; ``Hq % Hkv == 0``.
        v: ``(B, Hkv, Nk, D)`` values.
        causal: causal mask aligned to the last key (query ``i`` sees keys
            ``j <= i + Nk - Nq``), like flash-attn. With ``Nq > Nk`` the first
            ``Nq - Nk`` rows see no key and return 0 (lse ``-inf``) for every method, as
            flash-attn does; ``scaled_dot_product_attention(is_causal=True)`` aligns to the
            first key instead. Default False.
        scale: logit scale; default ``D ** -0.5``.
        config: method and budget (:class:`HyperAttentionConfig`); default
            ``HyperAttentionConfig()``, the structured method with its error guard.
        return_lse: also return ``lse: (B, Hq, Nq)`` fp32 (float64 for float64 inputs), the log-sum-exp of the
            (estimated) scaled logits of each row.
        return_stats: also return :class:`AttentionStats`.

    Returns:
        ``out: (B, Hq, Nq, D)`` in the input dtype (accumulated in fp32); then ``lse`` if
        ``return_lse``; then ``stats`` if ``return_stats``. ``method="structured"`` and
        ``"hyper"`` run Triton kernels on CUDA tensors and the PyTorch reference elsewhere
        (same answer for the same seed, up to rounding; when autograd needs a gradient the
        structured method's attention step runs FlexAttention's block-sparse passes, which
        have a backward, and float64 runs the reference); the peer patterns run their
        PyTorch reference on every device (no kernels: on CUDA past 16k keys this warns once
        per call site). Differentiable: the gradient is the exact gradient of the approximate
        function for the drawn hashes and samples. Meta and fake tensors (shape
        propagation, tracing) get outputs of the right shapes and dtypes without any
        computation (``stats.keys_per_query`` NaN, ``est_error``/``exact_heads`` empty).

    Raises:
        TypeError, ValueError: on invalid inputs, naming the argument.

    Examples::

        >>> import torch, hyperattn as ha
        >>> q = torch.randn(1, 8, 4096, 64); k = v = torch.randn(1, 2, 4096, 64)
        >>> cfg = ha.HyperAttentionConfig(method="hyper", min_seq_len=1024, seed=0)
        >>> out, lse = ha.hyper_attention(q, k, v, causal=True, config=cfg, return_lse=True)
        >>> out.shape, lse.shape
        (torch.Size([1, 8, 4096, 64]), torch.Size([1, 8, 4096]))
    """
    cfg = _DEFAULT_CONFIG if config is None else config
    check = cfg.check_finite if isinstance(cfg, HyperAttentionConfig) else True
    _check_inputs(q, k, v, causal, scale, config, False)
    # The check guards the selection, which indexes with values computed from q and k. It
    # waits for the GPU: on CUDA, a call that is one SDPA call (the structured default below
    # its crossover) skips it, since NaN or Inf cannot fault SDPA and come out as NaN there,
    # as in exact attention, and a host wait per call (per layer) would cost more than the
    # attention at 4k (measured 0.13 ms against 0.27 ms for cuDNN on an H200).
    sdpa_only = q.is_cuda and cfg.method == "structured" and not return_lse and _below_crossover(q, k, causal, cfg)
    if sdpa_only and not return_stats:
        # The shortest path to SDPA: no seed, plan or stats (per-call host time shows at 4k).
        from .methods.exact import exact

        return exact(q, k, v, _scale(q, scale), causal, False)[0]
    if check and not sdpa_only:
        _check_finite(q, k, v)
    return _attention(q, k, v, causal, scale, cfg, return_lse=return_lse, return_stats=return_stats)


def _scale(q: Tensor, scale: float | None) -> float:
    # The logit scale: the caller's, or D ** -0.5.
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _below_crossover(q: Tensor, k: Tensor, causal: bool, cfg: HyperAttentionConfig) -> bool:
    from .methods.structured import exact_only

    return exact_only(q, k, causal, cfg)


def _attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, cfg: HyperAttentionConfig, *,
               return_lse: bool, return_stats: bool = False, head_offset: int = 0, total_heads: int | None = None):
    """:func:`hyper_attention` on validated inputs; q's heads are global heads ``head_offset + [0, Hq)``.

    ``total_heads``: the global query head count (default Hq). The random draws of
    ``"structured"`` and ``"hyper"`` are keyed by global head, so a call on a slice of the
    heads returns that slice of the call on all of them (:mod:`hyperattn.distributed`); the
    peers draw per call, and callers pass them all heads.
    """
    scale = _scale(q, scale)
    if _shape_only(q):
        return _pack(*_shape_only_result(q, v, cfg.method), return_lse, return_stats)
    seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    out, lse, stats = _driver(cfg.method)(q, k, v, scale, causal, cfg, seed, need_lse=return_lse,
                                          head_offset=head_offset, total_heads=total_heads, need_stats=return_stats)
    return _pack(out.to(q.dtype), lse, stats, return_lse, return_stats)


def _pack(out: Tensor, lse: Tensor, stats: AttentionStats, return_lse: bool, return_stats: bool):
    result = (out,)
    if return_lse:
        result += (lse.to(_lse_dtype(out)),)
    if return_stats:
        result += (stats,)
    return result[0] if len(result) == 1 else result


def exact_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None, *,
                    return_lse: bool = False, check_finite: bool = True):
    """Exact attention with the same contract as :func:`hyper_attention` (causal rows that see no key give 0).

    Without ``return_lse`` it runs ``torch.nn.functional.scaled_dot_product_attention``
    (its fastest backend) where the masks agree; otherwise the fp32 reference (float64 for
    float64 inputs).

    Returns ``out: (B, Hq, Nq, D)`` in the input dtype, and ``lse: (B, Hq, Nq)`` fp32 (float64 for float64) if
    ``return_lse``.

    Examples::

        >>> import torch, hyperattn as ha
        >>> q = torch.randn(1, 4, 128, 32); k = v = torch.randn(1, 4, 128, 32)
        >>> ha.exact_attention(q, k, v, causal=True).shape
        torch.Size([1, 4, 128, 32])
    """
    _check_inputs(q, k, v, causal, scale, None, check_finite)
    scale = _scale(q, scale)
    if not return_lse and (not causal or q.shape[2] == k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    out, lse = attention_lse(q, k, v, scale, causal)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)
