"""Time the gathered-attention launch of each recursion level at one shape, and its parts.

Usage: ``python benchmarks/gathered_breakdown.py [n]`` on a CUDA machine (default 131072,
B1 Hq32 Hkv8 D128 bf16, causal, the default ``method="hyper"`` plan). Per level: the full
launch, the sorted key blocks only (no samples) and the samples only (empty key blocks),
in ms and TFLOP/s of scored pairs.
"""

from __future__ import annotations

import sys

import torch

from hyperattn.bench.forward import time_once_ms
from hyperattn.kernels.attention import gathered_attention
from hyperattn.kernels.hyper import _group_samples, kernel_plan
from hyperattn.kernels.lsh import lsh_sort_keys
from hyperattn.reference.hyper import draw_randomness


def main(n: int) -> None:
    bsz, hq, hkv, dim, block, m = 1, 32, 8, 128, 256, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(bsz, hq, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(bsz, hkv, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(bsz, hkv, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    plan = kernel_plan(n, n, 4096, block, m, True, "cuda")
    draws = draw_randomness(0, dim, 7, plan.num_approx, bsz, hq, m)
    proj, u = draws.proj.cuda(), draws.u.cuda()
    q_perm = torch.argsort(lsh_sort_keys(q, proj, plan.seg_q), dim=-1, stable=True)
    k_perm = torch.argsort(lsh_sort_keys(k, proj, plan.seg_k), dim=-1, stable=True)
    k_slot = torch.empty_like(k_perm).scatter_(-1, k_perm, torch.arange(n, device="cuda").expand_as(k_perm))
    acc = torch.zeros(bsz, hq, n, dim, device="cuda")
    lse = torch.zeros(bsz, hq, n, device="cuda")
    for g, group in enumerate(plan.groups):
        idx, logw, blk = _group_samples(group, u, k_slot[g], bsz, hq, hkv, block)
        no_keys = group.tiles.clone()
        no_keys[:, 3] = no_keys[:, 2]
        rows = int((group.tiles[:, 1] - group.tiles[:, 0]).sum())
        variants = {"full": (group.tiles, group.num_samples, block + m),
                    "block only": (group.tiles, torch.zeros_like(group.num_samples), block),
                    "samples only": (no_keys, group.num_samples, m)}
        for name, (tiles, ns, keys) in variants.items():
            def call():
                gathered_attention(q, k, v, q_perm[g], k_perm[g], tiles, idx, logw, blk, ns, dim ** -0.5, acc, acc,
                                   lse, group.prior)
            call()
            torch.cuda.synchronize()
            ms = sorted(time_once_ms(call, True) for _ in range(10))[5]
            tflops = 4 * dim * rows * keys * hq / (ms * 1e-3) / 1e12
            print(f"level {g} ({len(group.pieces)} pieces, {rows} rows, prior={group.prior is not None}) "
                  f"{name:12s} {ms:7.3f} ms {tflops:6.1f} TF/s", flush=True)


def _report_config() -> None:
    from hyperattn.kernels.attention import _KERNELS

    print("tuned config:", getattr(_KERNELS["gathered"][0], "best_config", None))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 131072)
    _report_config()
