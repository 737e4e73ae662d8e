"""Stage breakdown of the structured method's fixed budget on CUDA (selection vs attention passes).

    PYTHONPATH=src python benchmarks/structured_breakdown.py --lengths 32768 131072 --json out.json

Times each stage of :func:`hyperattn.methods.structured.run` with ``max_error=None`` on
B1 Hq32/Hkv8 D128 bf16 causal random input, with CUDA events (median of 5 after warm-up),
next to SDPA's fastest backend on the same input.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import hyperattn as ha
from hyperattn.bench.forward import versions
from hyperattn.kernels import structured as ker
from hyperattn.methods.structured import _concat
from hyperattn.reference import selection as S


def _ms(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def breakdown(n: int, causal: bool = True) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = ha.HyperAttentionConfig(seed=0, max_error=None)
    scale = 128 ** -0.5
    plan = S.make_plan(n, n, causal, cfg.query_block, cfg.window, cfg.chunk, 8192)
    heads = torch.arange(32, device="cuda")
    probe = S.probe_rows(plan, 0, 1, heads, cfg.probe_blocks, cfg.probe_rows // cfg.probe_blocks)
    row = {"n": n, "causal": causal}
    row["probe_ms"] = _ms(lambda: S.probe_exact(q, k, v, scale, plan, probe, cfg.heavy_columns, cfg.num_sinks))
    heavy = S.probe_exact(q, k, v, scale, plan, probe, cfg.heavy_columns, cfg.num_sinks)[2]
    row["pool_ms"] = _ms(lambda: S.pool(q, k, plan, cfg.score_group))
    pooled = S.pool(q, k, plan, cfg.score_group)
    row["lsh_ms"] = _ms(lambda: S.lsh_ranges(q, k, plan, cfg.lsh_block, cfg.lsh_num_projs, 0))
    lsh = S.lsh_ranges(q, k, plan, cfg.lsh_block, cfg.lsh_num_projs, 0)
    blocks = torch.arange(plan.first, plan.nqb, device="cuda").expand(1, 32, -1)
    chunk_of = blocks // plan.chunk_blocks
    hv = heavy.gather(2, chunk_of.unsqueeze(-1).expand(-1, -1, -1, heavy.shape[-1]))

    def select():
        scores = S.block_scores(pooled, scale, plan, blocks)
        return S.select(plan, blocks, scores, hv, torch.full_like(blocks, cfg.key_blocks),
                        torch.full_like(blocks, cfg.sample_size), cfg.num_sinks, cfg.sample_mix, 0, heads)

    row["select_ms"] = _ms(select)
    sel = _concat([select()], torch.ones_like(blocks, dtype=torch.bool))
    row["attend_ms"] = _ms(lambda: ker.attend(q, k, v, scale, plan, sel, lsh))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ha.hyper_attention(q, k, v, causal=causal, config=cfg.replace(min_seq_len=8192))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
    row["call_ms"] = _ms(lambda: ha.hyper_attention(q, k, v, causal=causal, config=cfg.replace(min_seq_len=8192)))
    for name, backend in (("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
                          ("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION)):
        try:
            kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
            with torch.nn.attention.sdpa_kernel(backend):
                row[f"sdpa_{name}_ms"] = _ms(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=causal))
        except RuntimeError as exc:
            row[f"sdpa_{name}_ms"] = str(exc)[:80]
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for n in args.lengths:
        rows.append(breakdown(n))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "versions": versions(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
