"""``torch.ops.hyperattn.attention``: :func:`~hyperattn.hyper_attention` as one opaque ``torch.library`` op.

``torch.compile`` traces into a plain Python function; traced through, the methods'
data-dependent selection (top-k sets, guard tiers, host-side lengths) breaks graphs and
recompiles on every new shape. Registered as a custom op with a fake implementation
(as flash-attn does), the call is a single node: the compiler sees only its output shapes,
``fullgraph=True`` holds, and a new sequence length costs at most the usual one
recompile to dynamic shapes.

The configuration crosses the op boundary as primitive arguments (one per field of
:class:`~hyperattn.config.HyperAttentionConfig`, ``None`` kept as ``None``), so the
compiled graph carries them as constants. ``seed=None`` (fresh randomness) is resolved
inside the op, and the seed used is returned so that backward replays the same hashes
and samples.

Autograd: backward recomputes the forward through the differentiable PyTorch path with
that seed and differentiates it, so the gradient is the exact gradient of the approximate
function, as for :func:`~hyperattn.hyper_attention` (flash-attn's recompute-in-backward).
Outside ``torch.compile``, a call that autograd will differentiate on CUDA with a Triton
backward (``"hyper"``, and ``"structured"`` where its kernels run) is
:func:`~hyperattn.hyper_attention` itself: those kernels keep O(N) state for their
backward, so one forward serves, where the op's recompute would run the forward twice.
Statistics (``return_stats``) do not cross the op boundary: call
:func:`~hyperattn.hyper_attention` for them.

Shape legend: ``B`` batch, ``Hq``/``Hkv`` query/key-value heads (``Hq % Hkv == 0``),
``Nq``/``Nk`` query/key lengths, ``D`` head dim.
"""

from typing import Optional

import torch
from torch import Tensor

from .config import HyperAttentionConfig
from .ops import hyper_attention

__all__ = ["attention", "OP_NAME"]

#: Qualified name of the registered op: ``torch.ops.hyperattn.attention``.
OP_NAME = "hyperattn::attention"

_DEFAULT_CONFIG = HyperAttentionConfig()


def _config(method: str, lsh_num_projs: int, block_size: int, sample_size: int, min_seq_len: Optional[int],
            seed: Optional[int], window: int, num_sinks: int, heavy_columns: int, probe_rows: int,
            max_error: Optional[float], check_finite: bool, query_block: int, key_blocks: int, score_group: int,
            chunk: int, probe_blocks: int, lsh_block: int, sample_mix: float,
            heavy_span: Optional[int]) -> HyperAttentionConfig:
    return HyperAttentionConfig(
        method=method, lsh_num_projs=lsh_num_projs, block_size=block_size, sample_size=sample_size,
        min_seq_len=min_seq_len, seed=seed, window=window, num_sinks=num_sinks, heavy_columns=heavy_columns,
        probe_rows=probe_rows, max_error=max_error, check_finite=check_finite, query_block=query_block,
        key_blocks=key_blocks, score_group=score_group, chunk=chunk, probe_blocks=probe_blocks, lsh_block=lsh_block,
        sample_mix=sample_mix, heavy_span=heavy_span)


# Positional order of the config arguments after (q, k, v, causal, scale): _config's parameters.
_CONFIG_FIELDS = tuple(_config.__code__.co_varnames[:_config.__code__.co_argcount])


@torch.library.custom_op(OP_NAME, mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float], method: str,
                  lsh_num_projs: int, block_size: int, sample_size: int, min_seq_len: Optional[int],
                  seed: Optional[int], window: int, num_sinks: int, heavy_columns: int, probe_rows: int,
                  max_error: Optional[float], check_finite: bool, query_block: int, key_blocks: int,
                  score_group: int, chunk: int, probe_blocks: int, lsh_block: int,
                  sample_mix: float, heavy_span: Optional[int], need_lse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``out (B, Hq, Nq, D)``, ``lse (B, Hq, Nq)`` fp32 (``(0,)`` when ``need_lse`` is False) and the seed
    used, a ``()`` int64 CPU tensor."""
    if seed is None:  # fresh randomness from torch's global generator, as hyper_attention draws it
        seed = int(torch.randint(0, 2**62, (1,)).item())
    cfg = _config(method, lsh_num_projs, block_size, sample_size, min_seq_len, seed, window, num_sinks,
                  heavy_columns, probe_rows, max_error, check_finite, query_block, key_blocks, score_group,
                  chunk, probe_blocks, lsh_block, sample_mix, heavy_span)
    # Gradients come from the backward op; without grad mode the methods take their
    # forward-only kernels on CUDA.
    with torch.no_grad():
        out, lse = _forward(q, k, v, causal, scale, cfg, need_lse)
    return out, lse, torch.tensor(seed, dtype=torch.int64)


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float], cfg: HyperAttentionConfig,
             need_lse: bool) -> tuple[Tensor, Tensor]:
    # Only a caller that asks for the LSE gets one: an LSE makes the structured default run
    # its own exact path below its crossover, where without it the call is one SDPA call
    # (through transformers at 131k: minutes per prefill instead of SDPA's 12 s).
    if need_lse:
        return hyper_attention(q, k, v, causal=causal, scale=scale, config=cfg, return_lse=True)
    out = hyper_attention(q, k, v, causal=causal, scale=scale, config=cfg)
    return out, q.new_empty((0,), dtype=torch.float32)


@_attention_op.register_fake
def _attention_fake(q, k, v, causal, scale, method, *config_args):
    # hyper_attention validates shapes and returns empty outputs for fake tensors
    # without computing (see ops._shape_only), so errors surface at trace time too.
    *config_args, need_lse = config_args
    cfg = _config(method, *config_args)
    out, lse = _forward(q, k, v, causal, scale, cfg, need_lse)
    return out, lse, torch.empty((), dtype=torch.int64)


@torch.library.custom_op("hyperattn::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Optional[Tensor], grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                           seed: Tensor, causal: bool, scale: Optional[float], method: str, lsh_num_projs: int,
                           block_size: int, sample_size: int, min_seq_len: Optional[int], window: int,
                           num_sinks: int, heavy_columns: int, probe_rows: int, max_error: Optional[float],
                           check_finite: bool, query_block: int, key_blocks: int, score_group: int,
                           chunk: int, probe_blocks: int, lsh_block: int, sample_mix: float,
                           heavy_span: Optional[int],
                           need_lse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``: the forward recomputed with ``seed`` through the differentiable path, differentiated."""
    cfg = _config(method, lsh_num_projs, block_size, sample_size, min_seq_len, int(seed), window, num_sinks,
                  heavy_columns, probe_rows, max_error, check_finite, query_block, key_blocks, score_group,
                  chunk, probe_blocks, lsh_block, sample_mix, heavy_span)
    # A custom op's implementation runs with autograd's dispatch keys excluded (it sits below
    # autograd); the recompute needs them back to build its graph.
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), \
            torch.enable_grad():
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        # The same path as the forward (with an LSE only if the forward computed one).
        out, lse = _forward(*inputs, causal, scale, cfg, need_lse)
        # Outputs no loss used come without a gradient.
        pairs = [(y, g) for y, g in ((out, grad_out), (lse, grad_lse)) if g is not None and y.numel()]
        return torch.autograd.grad([y for y, _ in pairs], inputs, [g for _, g in pairs])


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, grad_lse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, scale, *config_args, need_lse = inputs
    ctx.save_for_backward(q, k, v, output[2])
    ctx.causal, ctx.scale, ctx.config_args, ctx.need_lse = causal, scale, config_args, need_lse


def _backward(ctx, grad_out, grad_lse, _grad_seed):
    q, k, v, seed = ctx.saved_tensors
    # The seed argument is replaced by the seed the forward used (a tensor output).
    config_args = [arg for name, arg in zip(_CONFIG_FIELDS, ctx.config_args) if name != "seed"]
    dq, dk, dv = _attention_backward_op(grad_out, grad_lse, q, k, v, seed, ctx.causal, ctx.scale, *config_args,
                                        ctx.need_lse)
    return (dq, dk, dv, *(None,) * (3 + len(_CONFIG_FIELDS)))


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _direct(q: Tensor, k: Tensor, v: Tensor, cfg: HyperAttentionConfig) -> bool:
    """Whether :func:`attention` calls the method itself: eager autograd on CUDA, with a Triton backward.

    The op cannot carry the forward's state to its backward, so it recomputes the forward
    there (a second forward per training step: ~23 ms of ~100 for the structured default
    at 131k). The methods' own autograd keeps only O(N) state when Triton kernels run their
    backward; elsewhere (the references) it keeps the scores, which the recompute avoids.
    """
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return False
    if not any(isinstance(x, Tensor) and x.requires_grad for x in (q, k, v)):
        return False
    if not (isinstance(q, Tensor) and q.is_cuda and q.dtype != torch.float64):
        return False
    if cfg.method == "hyper":
        return True
    if cfg.method == "structured":
        from .methods.structured import backward_on_kernels

        return backward_on_kernels(q, cfg)
    return False


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
              config: Optional[HyperAttentionConfig] = None, *, return_lse: bool = False):
    """:func:`~hyperattn.hyper_attention` through the registered op ``torch.ops.hyperattn.attention``.

    Same arguments, results and errors as :func:`~hyperattn.hyper_attention` (without
    ``return_stats``); use this one inside ``torch.compile``d code.

    Args:
        q: ``(B, Hq, Nq, D)`` queries, float32/bfloat16/float16.
        k, v: ``(B, Hkv, Nk, D)`` keys and values, same dtype and device.
        causal: bottom-right causal mask (query ``i`` sees keys ``j <= i + Nk - Nq``). Default False.
        scale: logit scale; default ``D ** -0.5``.
        config: :class:`~hyperattn.config.HyperAttentionConfig`; default ``HyperAttentionConfig()``.
        return_lse: also return ``lse: (B, Hq, Nq)`` fp32. Default False.

    Returns:
        ``out: (B, Hq, Nq, D)`` in the input dtype, then ``lse`` if ``return_lse``.

    Raises:
        TypeError, ValueError: on invalid inputs, naming the argument (at trace time under
            ``torch.compile`` for everything but the values' finiteness).

    Examples::

        >>> import torch
        >>> from hyperattn import HyperAttentionConfig
        >>> from hyperattn.custom_op import attention
        >>> q = torch.randn(1, 4, 300, 16); k = v = torch.randn(1, 2, 300, 16)
        >>> cfg = HyperAttentionConfig(min_seq_len=64, seed=0)
        >>> compiled = torch.compile(attention, backend="eager", fullgraph=True)
        >>> torch.equal(compiled(q, k, v, True, None, cfg), attention(q, k, v, True, None, cfg))
        True
    """
    cfg = _DEFAULT_CONFIG if config is None else config
    if not isinstance(cfg, HyperAttentionConfig):
        raise TypeError(f"config: expected a HyperAttentionConfig or None, got {type(cfg).__name__}")
    if _direct(q, k, v, cfg):
        return hyper_attention(q, k, v, causal=causal, scale=scale, config=cfg, return_lse=return_lse)
    out, lse, _ = _attention_op(q, k, v, causal, scale, *(getattr(cfg, name) for name in _CONFIG_FIELDS), return_lse)
    return (out, lse) if return_lse else out
