"""Integrations with model libraries.

:mod:`hyperattn.integrations.hf` registers ``attn_implementation="hyper"`` with Hugging Face
transformers (imported on demand: transformers is an optional dependency).
"""

__all__: list[str] = []
