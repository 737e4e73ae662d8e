"""Public attention functions: input validation, method dispatch, stats.

Shape legend: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads with
``Hq % Hkv == 0`` (GQA/MQA; K/V are never repeated in memory), ``Nq``/``Nk`` query/key
lengths, ``D`` head dim.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import HyperAttentionConfig
from .stats import AttentionStats
from .reference.exact import attention_lse, exact_pairs
from .reference.hyper import causal_plan, hyper_attention_reference, noncausal_plan, scored_pairs

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
        # sync for all three, instead of an elementwise isfinite pass and a sync per tensor.
        peaks = torch.stack([torch.linalg.vector_norm(x, ord=float("inf")).float() for x in (q, k, v)])
        finite = torch.isfinite(peaks).tolist()
        for name, ok in zip(("q", "k", "v"), finite):
            if not ok:
                raise ValueError(f"{name}: expected finite values, found NaN or Inf "
                                 "(pass config=HyperAttentionConfig(check_finite=False) to skip this check)")


def _run_exact(q, k, v, scale, causal, config, seed, need_lse=True):
    from .methods.exact import exact

    out, lse = exact(q, k, v, scale, causal, need_lse)
    zeros = torch.zeros(q.shape[0], q.shape[1], device=q.device)
    stats = AttentionStats("exact", exact_pairs(0, q.shape[2], q.shape[2], k.shape[2], causal) / q.shape[2], zeros,
                           torch.ones_like(zeros, dtype=torch.bool))
    return out, lse, stats


def _run_hyper(q, k, v, scale, causal, config, seed, head_offset=0, total_heads=None):
    nq, nk = q.shape[2], k.shape[2]
    min_len = config.effective_min_seq_len
    if q.is_cuda and q.dtype != torch.float64:
        from .kernels import dispatch as kernel_dispatch  # imported lazily: needs triton
        out, lse = kernel_dispatch.hyper_attention_cuda(q, k, v, scale=scale, causal=causal, config=config,
                                                        seed=seed, head_offset=head_offset, total_heads=total_heads)
    else:
        out, lse = hyper_attention_reference(q, k, v, scale=scale, causal=causal, block_size=config.block_size,
                                             sample_size=config.sample_size, num_projs=config.lsh_num_projs,
                                             min_seq_len=min_len, seed=seed, head_offset=head_offset,
                                             total_heads=total_heads)
    plan = causal_plan(nq, nk, min_len) if causal else noncausal_plan(nq, nk, min_len)
    pairs = scored_pairs(plan, config.block_size, config.sample_size, nq, nk)
    nan = torch.full((q.shape[0], q.shape[1]), float("nan"), device=q.device)
    return out, lse, AttentionStats("hyper", pairs / nq, nan, torch.zeros_like(nan, dtype=torch.bool))


# Keys past which a method without kernels (the peer patterns) warns on CUDA: their PyTorch
# references take seconds per call there.
_SLOW_ON_CUDA = 16384

# Elements of one (B, Hq, Nq/64, Nk) selection mask the peer patterns may build per call;
# larger calls run in chunks of heads so memory stays bounded. (The structured method works
# on index lists in chunks of query blocks and needs no such split.)
_MASK_ELEMENTS = 1 << 27


def _in_head_chunks(runner: Callable) -> Callable:
    """Run ``runner`` on chunks of (batch, heads) whose selection masks fit ``_MASK_ELEMENTS``.

    Chunks are whole KV-head groups where they fit, else single query heads; each chunk
    draws from its own seed derived from ``seed``, so results stay reproducible and the
    same on every device. Calls that fit run whole, unchanged.
    """

    def run(q, k, v, scale, causal, config, seed):
        bsz, hq, nq, _ = q.shape
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

    return run


def _peer(name: str) -> Callable:
    from .reference import peers

    return _in_head_chunks(peers.RUNNERS[name])


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
    if q.is_cuda and cfg.method not in ("hyper", "exact", "structured") and k.shape[2] > _SLOW_ON_CUDA:
        warnings.warn(f"hyper_attention: method={cfg.method!r} has no GPU kernel yet and runs its PyTorch "
                      f"reference ({k.shape[2]} keys: seconds per call); method='hyper' runs Triton kernels",
                      stacklevel=3)
    if cfg.method == "structured":
        from .methods import structured

        out, lse, stats = structured.run(q, k, v, scale, causal, cfg, seed, need_lse=return_lse,
                                         head_offset=head_offset, need_stats=return_stats)
    elif cfg.method == "exact":
        out, lse, stats = _run_exact(q, k, v, scale, causal, cfg, seed, need_lse=return_lse)
    elif cfg.method == "hyper":
        out, lse, stats = _run_hyper(q, k, v, scale, causal, cfg, seed, head_offset, total_heads)
    else:
        out, lse, stats = _peer(cfg.method)(q, k, v, scale, causal, cfg, seed)
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
