"""hyperattn: long-context attention in near-linear time.

HyperAttention (arXiv 2310.05869) with a structured, error-guarded default method,
Triton kernels on CUDA and a PyTorch reference everywhere else.
"""

from .config import METHODS, HyperAttentionConfig
from .ops import AttentionStats, exact_attention, hyper_attention

__all__ = ["HyperAttentionConfig", "METHODS", "AttentionStats", "hyper_attention", "exact_attention"]
__version__ = "0.1.0"
