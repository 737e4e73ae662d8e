"""Triton kernels of the CUDA fast path (imported lazily by :mod:`hyperattn.ops`; need ``triton``).

- :mod:`~hyperattn.kernels.lsh`: fused hashing into integer sort keys;
- :mod:`~hyperattn.kernels.attention`: range and gathered-column attention with an
  online softmax and in-place LSE merges;
- :mod:`~hyperattn.kernels.hyper`: the paper's method as a few launches;
- :mod:`~hyperattn.kernels.selection`: the structured method's selection kernels (probe rows,
  their exact attention and column mass, pooled means, block scores, LSH ranges);
- :mod:`~hyperattn.kernels.sparse`: its attention step in Triton, two launches forward and
  five backward;
- :mod:`~hyperattn.kernels.structured`: the attention step's entry point, and its
  differentiable engine in three FlexAttention passes.

Which backend runs, and the ``autograd.Function`` around it, is the method's driver's
choice (:mod:`hyperattn.methods`).
"""
