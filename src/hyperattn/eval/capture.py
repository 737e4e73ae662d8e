"""Capture the real post-RoPE Q/K/V of a model's attention layers (``hyperattn capture``).

A transformers ``AttentionInterface`` function records the query, key and value tensors
each attention layer hands to its attention kernel (after the rotary embedding, before
any K/V repetition, so GQA shapes are kept) and then runs SDPA as usual, so the forward
pass and its logits are the exact model's.

Shape legend: ``Hq`` query heads, ``Hkv`` key/value heads, ``N`` tokens, ``D`` head dim.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Capture", "capture_qkv", "save_capture", "load_capture", "parse_layers", "add_arguments", "run"]

_INTERFACE_NAME = "hyperattn_capture"


@dataclass
class Capture:
    """Q/K/V of chosen layers from one forward pass.

    Attributes:
        layers: layer index -> ``(q (1, Hq, N, D), k (1, Hkv, N, D), v (1, Hkv, N, D))``.
        scale: the attention logit scale the model uses.
        hidden: ``(1, N, hidden)`` fp32 final hidden states (before the LM head), or None.
        meta: free-form description (model, text, tokens, dtype).
    """

    layers: dict[int, tuple[Tensor, Tensor, Tensor]]
    scale: float
    hidden: Tensor | None = None
    meta: dict = field(default_factory=dict)


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """Layer indices from ``"all"``/None, ``"0,3,8"`` or ``"0-5,29"``; ValueError naming ``--layers``."""
    if text is None or text.strip() in ("", "all"):
        return list(range(num_layers))
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                layers += list(range(lo, hi + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise ValueError(f"--layers: expected 'all' or comma-separated indices/ranges like '0,3,8-10', "
                             f"got {text!r}") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--layers: expected indices in [0, {num_layers - 1}], got {bad}")
    return sorted(set(layers))


@contextmanager
def _recording(model, layers: set[int], store: dict, dtype: torch.dtype, scales: list):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def record(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if module.layer_idx in layers:
            store[module.layer_idx] = tuple(x.detach().to(dtype).clone() for x in (query, key, value))
            scales.append(float(scaling) if scaling is not None else query.shape[-1] ** -0.5)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(_INTERFACE_NAME, record)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_INTERFACE_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def capture_qkv(model, input_ids: Tensor, layers: list[int] | None = None, dtype: torch.dtype = torch.float32,
                keep_hidden: bool = False) -> Capture:
    """Run ``model`` on ``input_ids (1, N)`` with exact attention and record Q/K/V of ``layers``.

    ``layers=None`` records every layer; tensors are stored in ``dtype`` (default fp32).
    With ``keep_hidden`` the final hidden states are kept too, so the exact perplexity
    needs no second forward (see :func:`hyperattn.eval.metrics.token_nll`).

    Examples::

        >>> from hyperattn.eval.model import load_embedded_model
        >>> from hyperattn.eval.text import tokenize_text
        >>> model, tok = load_embedded_model()
        >>> cap = capture_qkv(model, tokenize_text(tok, "argparse", 256), layers=[0, 5])
        >>> sorted(cap.layers), cap.layers[0][0].shape
        ([0, 5], torch.Size([1, 9, 256, 64]))
    """
    num_layers = model.config.num_hidden_layers
    chosen = set(range(num_layers) if layers is None else layers)
    store: dict = {}
    scales: list = []
    with _recording(model, chosen, store, dtype, scales):
        out = model.model(input_ids=input_ids)
    hidden = out.last_hidden_state.float() if keep_hidden else None
    meta = {"tokens": int(input_ids.shape[1]), "dtype": str(dtype).replace("torch.", ""),
            "model": getattr(model.config, "_name_or_path", "") or model.config.model_type}
    return Capture(layers=dict(sorted(store.items())), scale=scales[0] if scales else float("nan"), hidden=hidden,
                   meta=meta)


def save_capture(capture: Capture, path: str | Path) -> None:
    """Write a :class:`Capture` (without hidden states) with ``torch.save``."""
    torch.save({"layers": capture.layers, "scale": capture.scale, "meta": capture.meta}, Path(path))


def load_capture(path: str | Path) -> Capture:
    """Read a file written by :func:`save_capture` / ``hyperattn capture``."""
    data = torch.load(Path(path), weights_only=True)
    return Capture(layers={int(i): tuple(t) for i, t in data["layers"].items()}, scale=float(data["scale"]),
                   meta=dict(data["meta"]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli_args import positive_int, writable_file
    from .text import DEFAULT_TEXT

    parser.add_argument("output", type=writable_file, help="file to write (torch.save format; read it with hyperattn.eval.capture."
                                       "load_capture)")
    parser.add_argument("--text", default=DEFAULT_TEXT,
                        help=f"standard-library module whose source is the input text (default {DEFAULT_TEXT})")
    parser.add_argument("--tokens", type=positive_int, default=8192, help="number of tokens (default 8192)")
    parser.add_argument("--layers", default="all", help="layers to capture: 'all' (default), '0,3,8' or '0-5'")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="storage dtype (default float32)")


def run(args: argparse.Namespace) -> int:
    from .model import EvalExtraMissing, load_embedded_model
    from .text import tokenize_text

    try:
        model, tokenizer = load_embedded_model()
        layers = parse_layers(args.layers, model.config.num_hidden_layers)
        input_ids = tokenize_text(tokenizer, args.text, args.tokens)
    except (EvalExtraMissing, ValueError, ImportError) as exc:
        print(f"hyperattn capture: {exc}", file=sys.stderr)
        return 2
    capture = capture_qkv(model, input_ids, layers, dtype=getattr(torch, args.dtype))
    capture.meta["text"] = args.text
    save_capture(capture, args.output)
    q, k, _ = next(iter(capture.layers.values()))
    print(f"wrote {args.output}: {len(capture.layers)} layers, q {tuple(q.shape)}, k/v {tuple(k.shape)}, "
          f"{args.dtype}, scale {capture.scale:.4g}")
    return 0
