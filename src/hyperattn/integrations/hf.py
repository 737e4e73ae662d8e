"""Hugging Face transformers (v5): ``attn_implementation="hyper"`` and a per-layer policy.

Importing this module registers ``"hyper"`` with ``transformers.AttentionInterface`` and,
for the masks, with ``transformers.masking_utils.AttentionMaskInterface`` (it builds the
same masks as ``"sdpa"``: ``None`` for a plain causal prefill, else a 4-D bool mask).
After that any model that follows the AttentionInterface (Llama, Qwen, Mistral, SmolLM,
...) takes the switch::

    import hyperattn.integrations.hf
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="hyper")

or, on a loaded model, with a policy choosing layers and budgets::

    from hyperattn.integrations import hf
    hf.enable(model, hf.HyperPolicy(config=HyperAttentionConfig(), layers=range(-8, 0)))
    hf.disable(model)   # back to "sdpa"

What the attention function does with what transformers passes (``q: (B, Hq, Nq, D)``,
``k, v: (B, Hkv, Nk, D)``, GQA passed through without repeating K/V):

- layers outside the policy and queries shorter than ``min_query_len`` (decode steps,
  speculative verification, short chunks) run transformers' own SDPA path over the KV
  cache, unchanged;
- a causal prefill with ``attention_mask=None`` runs ``hyper_attention(causal=True)``
  through the registered op :func:`hyperattn.custom_op.attention`, so ``torch.compile``
  on the model sees one opaque node per attention call (a padding mask's analysis reads
  the mask's values: a graph break, but no recompiles per length);
  continuation over a KV cache (``Nq < Nk``) aligns the last query with the last key;
- a 4-D bool mask (or an additive float mask of 0 and the dtype minimum) is analysed per
  sequence: causal masks with left and/or right padding run exactly as that sequence
  would without padding (its keys ``[k0, k1)``, its queries ``[q0, q1)``); rows of padding
  tokens return zeros, as SDPA does for fully masked rows. Any other mask (packed
  sequences, sliding windows, bidirectional blocks, biases) raises ``ValueError`` rather
  than computing something else;
- ``output_attentions=True``, attention dropout, ``softcap``, ``position_bias`` and
  attention sinks (``s_aux``) raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

from ..config import HyperAttentionConfig
from ..custom_op import attention

__all__ = ["ATTN_IMPLEMENTATION", "HyperPolicy", "register", "enable", "disable", "hyper_attention_forward"]

#: Name under which the attention function is registered with transformers.
ATTN_IMPLEMENTATION = "hyper"

# Attribute carrying the policy on the model and on every module with a ``layer_idx``.
_POLICY_ATTR = "_hyperattn_policy"
# Keyword arguments of the attention interface that change the attention itself.
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux")


@dataclass(frozen=True)
class HyperPolicy:
    """Which layers of a model use approximate attention, with which configuration.

    Args:
        config: configuration of every covered layer without its own entry in
            ``layer_configs``; ``None`` (default) means ``HyperAttentionConfig()``, the
            structured method with its error guard.
        layers: layer indices that use approximate attention; ``None`` (default) means
            all. Negative indices count from the end (``range(-8, 0)``: the last 8) and
            are resolved by :func:`enable` against the model's layer count.
        layer_configs: per-layer configurations overriding ``config``; every key must
            also be in ``layers`` when ``layers`` is given. Default empty.
        min_query_len: queries shorter than this run exact SDPA over the whole KV cache
            (decode steps, speculative verification, short chunks), where exact attention
            costs ``Nq * Nk``, linear in the cache, and beats the fixed cost of hashing
            and probing every key. Default 256.

    Raises:
        TypeError, ValueError: on a wrong type, a repeated layer, a layer config for an
            uncovered layer, or ``min_query_len < 1``.

    Examples::

        >>> from hyperattn import HyperAttentionConfig
        >>> from hyperattn.integrations.hf import HyperPolicy
        >>> policy = HyperPolicy(config=HyperAttentionConfig(method="hyper"), layers=[28, 29])
        >>> policy.config_for(29).method, policy.config_for(3)
        ('hyper', None)
    """

    config: HyperAttentionConfig | None = None
    layers: Sequence[int] | None = None
    layer_configs: Mapping[int, HyperAttentionConfig] = field(default_factory=dict)
    min_query_len: int = 256

    def __post_init__(self) -> None:
        if self.config is not None and not isinstance(self.config, HyperAttentionConfig):
            raise TypeError(f"config: expected a HyperAttentionConfig or None, got {type(self.config).__name__}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise TypeError(f"layers: expected a sequence of ints or None, got {type(self.layers).__name__}")
            layers = tuple(self.layers)
            for layer in layers:
                _check_layer("layers", layer)
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers: expected distinct layer indices, got {list(layers)}")
            object.__setattr__(self, "layers", layers)
        if not isinstance(self.layer_configs, Mapping):
            raise TypeError(f"layer_configs: expected a mapping of int -> HyperAttentionConfig, "
                            f"got {type(self.layer_configs).__name__}")
        for layer, cfg in self.layer_configs.items():
            _check_layer("layer_configs", layer)
            if not isinstance(cfg, HyperAttentionConfig):
                raise TypeError(f"layer_configs[{layer}]: expected a HyperAttentionConfig, got {type(cfg).__name__}")
            if self.layers is not None and layer not in self.layers:
                raise ValueError(f"layer_configs: layer {layer} is not in layers {list(self.layers)}; "
                                 "add it to layers or drop its config")
        object.__setattr__(self, "layer_configs", MappingProxyType(dict(self.layer_configs)))
        if isinstance(self.min_query_len, bool) or not isinstance(self.min_query_len, int):
            raise TypeError(f"min_query_len: expected an int, got {type(self.min_query_len).__name__}")
        if self.min_query_len < 1:
            raise ValueError(f"min_query_len: expected an int >= 1, got {self.min_query_len}")

    def config_for(self, layer_idx: int | None) -> HyperAttentionConfig | None:
        """The configuration of layer ``layer_idx``, or ``None`` where exact SDPA runs.

        A module without a layer index (``None``) is covered only when ``layers`` is None.
        """
        if self.layers is not None and layer_idx not in self.layers:
            return None
        if layer_idx in self.layer_configs:
            return self.layer_configs[layer_idx]
        return self.config if self.config is not None else HyperAttentionConfig()

    def resolve(self, num_layers: int) -> HyperPolicy:
        """This policy with negative layer indices counted from ``num_layers``; ValueError if out of range."""
        def absolute(name: str, layer: int) -> int:
            index = layer + num_layers if layer < 0 else layer
            if not 0 <= index < num_layers:
                raise ValueError(f"{name}: layer {layer} is out of range for a model with {num_layers} layers")
            return index

        layers = None if self.layers is None else [absolute("layers", layer) for layer in self.layers]
        configs = {absolute("layer_configs", layer): cfg for layer, cfg in self.layer_configs.items()}
        return dataclasses.replace(self, layers=layers, layer_configs=configs)


_DEFAULT_POLICY = HyperPolicy()


def _check_layer(name: str, layer) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{name}: expected int layer indices, got {type(layer).__name__} ({layer!r})")


def register() -> None:
    """Register ``"hyper"`` with transformers' attention and mask interfaces (idempotent).

    Called on import of this module; calling it again does nothing.

    Examples::

        >>> from transformers import AttentionInterface
        >>> from hyperattn.integrations import hf
        >>> hf.register()
        >>> "hyper" in AttentionInterface()
        True
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not hyper_attention_forward:
        AttentionInterface.register(ATTN_IMPLEMENTATION, hyper_attention_forward)
    # Without a mask function transformers would pass no mask at all to a custom
    # implementation, silently dropping padding; SDPA's masks are what we analyse.
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    if AttentionMaskInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not sdpa_mask:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def enable(model, policy: HyperPolicy | None = None):
    """Switch a loaded transformers model to ``attn_implementation="hyper"`` under ``policy``.

    Args:
        model: a ``transformers.PreTrainedModel`` whose attention follows the
            AttentionInterface.
        policy: layers and configurations (:class:`HyperPolicy`); ``None`` (default)
            means ``HyperPolicy()``: every layer, the default configuration.

    Returns:
        ``model`` itself, switched in place.

    Raises:
        TypeError: ``model`` is not a transformers model or ``policy`` not a HyperPolicy.
        ValueError: a layer index of the policy does not exist in the model.

    Examples::

        >>> from hyperattn import HyperAttentionConfig
        >>> from hyperattn.eval.model import load_embedded_model
        >>> from hyperattn.integrations import hf
        >>> model, tokenizer = load_embedded_model()  # doctest: +SKIP
        >>> hf.enable(model, hf.HyperPolicy(layers=range(-15, 0)))  # doctest: +SKIP
        >>> model.config._attn_implementation  # doctest: +SKIP
        'hyper'
    """
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if policy is None:
        policy = HyperPolicy()
    if not isinstance(policy, HyperPolicy):
        raise TypeError(f"policy: expected a HyperPolicy or None, got {type(policy).__name__}")
    register()
    policy = policy.resolve(_num_layers(model))
    for module in model.modules():
        if module is model or isinstance(getattr(module, "layer_idx", None), int):
            setattr(module, _POLICY_ATTR, policy)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def disable(model):
    """Restore ``attn_implementation="sdpa"`` and drop the policy; returns ``model``.

    Examples::

        >>> from hyperattn.integrations import hf
        >>> hf.disable(hf.enable(model)).config._attn_implementation  # doctest: +SKIP
        'sdpa'
    """
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    for module in model.modules():
        if _POLICY_ATTR in vars(module):
            delattr(module, _POLICY_ATTR)
    model.set_attn_implementation("sdpa")
    return model


def _num_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    if isinstance(count, int):
        return count
    indices = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    return max(indices) + 1 if indices else 0


def hyper_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs) -> tuple[Tensor, None]:
    """The attention function transformers calls for ``attn_implementation="hyper"``.

    Args:
        module: the attention module; its ``layer_idx`` selects the configuration from
            the policy that :func:`enable` attached (``HyperPolicy()`` if none).
        query: ``(B, Hq, Nq, D)``.
        key, value: ``(B, Hkv, Nk, D)`` (the whole KV cache), ``Hq % Hkv == 0``.
        attention_mask: ``None`` or ``(B | 1, 1 | Hq, Nq, Nk)`` bool (True = attend) or
            additive float mask, as built by transformers' SDPA mask function.
        dropout: must be 0 on the approximate path.
        scaling: logit scale; default ``D ** -0.5``.
        is_causal: default ``module.is_causal`` (True if absent).

    Returns:
        ``(out, None)`` with ``out: (B, Nq, Hq, D)`` in the input dtype; no attention
        weights are ever materialised.

    Raises:
        ValueError: ``output_attentions=True``, dropout, unsupported keyword arguments,
            or a mask that is not causal with left/right padding (see the module docs).

    Examples::

        >>> import torch
        >>> from hyperattn.integrations.hf import hyper_attention_forward
        >>> q = torch.randn(1, 4, 300, 16); k = v = torch.randn(1, 2, 300, 16)
        >>> out, weights = hyper_attention_forward(torch.nn.Module(), q, k, v, None, is_causal=True)
        >>> out.shape, weights
        (torch.Size([1, 300, 4, 16]), None)
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions: attn_implementation='hyper' never materialises attention weights; "
                         "load the model with attn_implementation='eager' to get them")
    policy = getattr(module, _POLICY_ATTR, None) or _DEFAULT_POLICY
    config = policy.config_for(getattr(module, "layer_idx", None))
    if config is None or query.shape[2] < policy.min_query_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: not supported by attn_implementation='hyper'; use 'sdpa' or 'eager' "
                             "for this model")
    if dropout:
        raise ValueError(f"dropout: attn_implementation='hyper' has no attention dropout, got {dropout} "
                         "(call model.eval() or set the model's attention_dropout to 0)")
    nq, nk = query.shape[2], key.shape[2]
    causal_module = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    # As in transformers' SDPA path: without a mask a single query row (a decode step) sees
    # every key. With a mask it is a causal row like any other: the padding analysis below
    # finds its keys (a left-padded batch's decode step sees all but the padding).
    causal = causal_module and nq > 1
    if attention_mask is None:
        if causal and nk > nq:
            # transformers passes no mask with Nk > Nq only for the first chunk of a static
            # cache, where SDPA's top-left causal alignment means: keys [0, Nq).
            key, value = key[:, :, :nq], value[:, :, :nq]
        out = attention(query, key, value, causal=causal, scale=scaling, config=config)
        return out.transpose(1, 2).contiguous(), None
    if not causal_module:
        raise ValueError("attention_mask: attn_implementation='hyper' takes masks only for causal attention; "
                         "bidirectional attention must come with attention_mask=None")
    segments = _padded_causal_segments(attention_mask, query.shape[0], nq, nk)
    return _segmented_attention(query, key, value, segments, scaling, config).transpose(1, 2).contiguous(), None


def _bool_mask(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"attention_mask: expected a bool or float tensor, got {mask.dtype}")
    allowed = mask == 0
    # An additive mask holds 0 (attend) and a huge negative (masked); any other value is a
    # bias that a sparse method cannot apply.
    if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        raise ValueError("attention_mask: a float mask with values other than 0 and the dtype minimum is an "
                         "attention bias, which attn_implementation='hyper' does not support")
    return allowed


def _padded_causal_segments(mask: Tensor, batch: int, nq: int, nk: int) -> list[tuple[int, int, int, int] | None]:
    """Per sequence ``(q0, q1, k0, k1)``: rows ``[q0, q1)`` attend keys ``[k0, k1)`` causally, bottom-right.

    ``None`` for a sequence with no real token. ValueError for any mask that is not
    exactly that pattern with padding rows (all masked before ``q0``; the whole of
    ``[k0, k1)`` after ``q1``, whose own keys lie beyond ``k1``).
    """
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[-2:] != (nq, nk):
        raise ValueError(f"attention_mask: expected None or a 4-D mask (B, 1, Nq, Nk) = ({batch}, 1, {nq}, {nk}), "
                         f"got shape {tuple(mask.shape)}")
    mask = _bool_mask(mask)
    if mask.shape[1] != 1 and not bool((mask == mask[:, :1]).all()):
        raise ValueError("attention_mask: per-head masks are not supported by attn_implementation='hyper'")
    segments = []
    for b in range(batch):
        m = mask[min(b, mask.shape[0] - 1), 0]
        count = m.sum(-1)
        real = count > 0
        if not bool(real.any()):
            segments.append(None)
            continue
        as_int = m.to(torch.uint8)
        lo = as_int.argmax(-1)
        hi = nk - as_int.flip(-1).argmax(-1)
        q0 = int(real.to(torch.uint8).argmax())
        k0 = int(lo[q0])
        steps = hi[q0 + 1:] - hi[q0:-1]
        q1 = q0 + 1 + int((steps == 1).sum())
        k1 = int(hi[q1 - 1])
        ok = (bool(real[q0:].all())                                   # empty rows only before q0 (left padding)
              and bool((count[q0:] == hi[q0:] - lo[q0:]).all())      # each row a contiguous run of keys
              and bool((lo[q0:] == k0).all())                        # all starting at the sequence's first key
              and bool((steps[: q1 - q0 - 1] == 1).all())            # real rows: one more key each (causal)
              and bool((steps[q1 - q0 - 1:] == 0).all())             # then right padding: same keys as the last
              and k1 - q1 + nq <= nk)                                # padding rows' own keys exist beyond k1
        if not ok:
            raise ValueError("attention_mask: attn_implementation='hyper' supports causal masks with left or right "
                             "padding only, not packed sequences, sliding windows, bidirectional blocks or custom "
                             "patterns; use attn_implementation='sdpa' for this model or input")
        segments.append((q0, q1, k0, k1))
    return segments


def _segmented_attention(q: Tensor, k: Tensor, v: Tensor, segments, scale, config) -> Tensor:
    """``(B, Hq, Nq, D)``: each group of sequences with the same segment in one causal call; zeros elsewhere."""
    nq, nk = q.shape[2], k.shape[2]
    if all(s == (0, nq, 0, nk) for s in segments):
        return attention(q, k, v, causal=True, scale=scale, config=config)
    out = q.new_zeros(q.shape[:3] + (v.shape[-1],))
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for b, segment in enumerate(segments):
        if segment is not None:
            groups.setdefault(segment, []).append(b)
    for (q0, q1, k0, k1), members in groups.items():
        index = torch.tensor(members, device=q.device)
        part = attention(q[index, :, q0:q1], k[index, :, k0:k1], v[index, :, k0:k1], causal=True,
                         scale=scale, config=config)
        out[index, :, q0:q1] = part
    return out


register()
