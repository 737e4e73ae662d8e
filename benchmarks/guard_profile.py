"""Where the guarded default's time goes on random input (every chunk ends exact), on CUDA.

    PYTHONPATH=src python benchmarks/guard_profile.py --lengths 65536 131072 --min-seq-len 65536 --json out.json

The guard's cost is the call's time over SDPA's (the call ends in one SDPA call when every
chunk is exact). For each length: the call and cuDNN SDPA timed with CUDA events (median of
5 after warm-up), then one profiled call: its kernels' summed GPU time, the kernels that took
longest, and the host-side ops that took longest (host waits show there as ``aten::item``,
``aten::is_nonzero`` or ``aten::_local_scalar_dense``).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import hyperattn as ha
from hyperattn.bench.forward import time_once_ms, versions


def _ms(fn, reps=5):
    fn()  # warm-up (compiles and tunes)
    return statistics.median(time_once_ms(fn, True) for _ in range(reps))


def profile_guard(n: int, min_seq_len: int, causal: bool = True) -> dict:
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = ha.HyperAttentionConfig(seed=0, min_seq_len=min_seq_len)
    row = {"n": n, "causal": causal, "min_seq_len": min_seq_len, "impl": "structured"}
    row["call_ms"] = _ms(lambda: ha.hyper_attention(q, k, v, causal=causal, config=cfg))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        row["sdpa_cudnn_ms"] = _ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                         enable_gqa=True))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ha.hyper_attention(q, k, v, causal=causal, config=cfg)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.self_device_time_total > 0]
    row["kernels_total_ms"] = sum(e.self_device_time_total for e in kernels) / 1000
    row["kernel_launches"] = sum(e.count for e in kernels)
    row["top_kernels_ms"] = [{"name": e.key[:100], "ms": e.self_device_time_total / 1000, "count": e.count}
                             for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]]
    ops = [e for e in events if e.key.startswith("aten::")]
    row["top_host_ops_ms"] = [{"name": e.key, "ms": e.cpu_time_total / 1000, "count": e.count}
                              for e in sorted(ops, key=lambda e: -e.cpu_time_total)[:15]]
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--min-seq-len", type=int, default=65536)
    parser.add_argument("--noncausal", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = [profile_guard(n, args.min_seq_len, not args.noncausal) for n in args.lengths]
    for r in rows:
        print(f"n={r['n']} min_seq_len={r['min_seq_len']}: call {r['call_ms']:.1f} ms, cuDNN {r['sdpa_cudnn_ms']:.1f} ms, "
              f"kernels {r['kernels_total_ms']:.1f} ms in {r['kernel_launches']} launches")
        for kern in r["top_kernels_ms"]:
            print(f"   {kern['ms']:8.3f} ms x{kern['count']:<4} {kern['name']}")
        for op in r["top_host_ops_ms"]:
            print(f"   host {op['ms']:8.3f} ms x{op['count']:<4} {op['name']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**versions(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
