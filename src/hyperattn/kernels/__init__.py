"""Triton kernels of the CUDA fast path (imported lazily by :mod:`hyperattn.ops`; need ``triton``).

- :mod:`~hyperattn.kernels.lsh`: fused hashing into integer sort keys;
- :mod:`~hyperattn.kernels.attention`: range and gathered-column attention with an
  online softmax and in-place LSE merges;
- :mod:`~hyperattn.kernels.hyper`: the paper's method as a few launches;
- :mod:`~hyperattn.kernels.structured`: the structured method's attention and block scores;
- :mod:`~hyperattn.kernels.dispatch`: the entry point, fallbacks and autograd.
"""
