"""Long texts that are always on the machine: the Python standard library's own sources."""

from __future__ import annotations

import inspect
import importlib

__all__ = ["DEFAULT_TEXT", "HELDOUT_TEXT", "stdlib_text", "tokenize_text"]

#: Text of the default ``hyperattn eval`` run.
DEFAULT_TEXT = "argparse"
#: Text kept out of every test and every tuning run (the issue targets are measured on it).
HELDOUT_TEXT = "typing"


def stdlib_text(module: str) -> str:
    """Source code of a standard-library module, e.g. ``"argparse"``."""
    return inspect.getsource(importlib.import_module(module))


def tokenize_text(tokenizer, module: str, num_tokens: int):
    """``(1, num_tokens)`` int64 token ids from the start of ``module``'s source; ValueError if too short."""
    ids = tokenizer(stdlib_text(module), return_tensors="pt").input_ids
    if ids.shape[1] < num_tokens:
        raise ValueError(f"num_tokens: the source of {module!r} has only {ids.shape[1]} tokens, "
                         f"asked for {num_tokens}")
    return ids[:, :num_tokens]
