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
from hyperattn.bench.forward import time_once_ms, versions
from hyperattn.kernels import structured as ker
from hyperattn.kernels import selection as ker_sel
from hyperattn.reference import selection as S


# heavy_span of the second probe and call rows (None: the full scan, the default's before 32768).
_SPAN = None
_SPAN_NAME = "full_scan" if _SPAN is None else f"span_{_SPAN}"


def _ms(fn, reps=5):
    fn()  # warm-up (compiles and tunes)
    return statistics.median(time_once_ms(fn, True) for _ in range(reps))


def breakdown(n: int, causal: bool = True, profile: bool = False, flex: bool = False) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = ha.HyperAttentionConfig(seed=0, max_error=None, min_seq_len=4096)
    scale = 128 ** -0.5
    plan = S.make_plan(n, n, causal, cfg.query_block, cfg.window, cfg.chunk, cfg.min_seq_len)
    heads = torch.arange(32, device="cuda")
    kv_heads = torch.arange(8, device="cuda")
    probe = S.probe_rows(plan, 0, 1, heads, cfg.probe_blocks, cfg.probe_rows // cfg.probe_blocks)
    row = {"n": n, "causal": causal, "impl": "structured-fixed"}
    row["probe_rows_ms"] = _ms(lambda: ker_sel.probe_rows(plan, 0, 1, heads, cfg.probe_blocks,
                                                          cfg.probe_rows // cfg.probe_blocks))
    # As the call runs it without the guard and stats: the heavy columns alone, the finding
    # rows over the default's heavy_span; and over _SPAN keys.
    row["probe_ms"] = _ms(lambda: ker_sel.probe_exact(q, k, v, scale, plan, probe, cfg.heavy_columns, cfg.num_sinks,
                                                      cfg.probe_blocks, need_out=False, span=cfg.heavy_span))
    row[f"probe_{_SPAN_NAME}_ms"] = _ms(lambda: ker_sel.probe_exact(q, k, v, scale, plan, probe, cfg.heavy_columns,
                                                                    cfg.num_sinks, cfg.probe_blocks, need_out=False,
                                                                    span=_SPAN))
    heavy = ker_sel.probe_exact(q, k, v, scale, plan, probe, cfg.heavy_columns, cfg.num_sinks, cfg.probe_blocks,
                                need_out=False, span=cfg.heavy_span)[2]
    # The CUDA path's stages (kernels.selection), as the driver calls them.
    row["pool_ms"] = _ms(lambda: ker_sel.pool(q, k, plan, cfg.score_group))
    pooled = ker_sel.pool(q, k, plan, cfg.score_group)
    row["lsh_ms"] = _ms(lambda: ker_sel.lsh_ranges(q, k, plan, cfg.lsh_block, cfg.lsh_num_projs, 0))
    lsh = ker_sel.lsh_ranges(q, k, plan, cfg.lsh_block, cfg.lsh_num_projs, 0)
    blocks = torch.arange(plan.first, plan.nqb, device="cuda").expand(1, 32, -1)

    def scores():
        sc = ker_sel.block_scores(pooled, scale, plan, blocks)
        return ker_sel.rank_blocks(sc, cfg.key_blocks), S.chunk_scores(sc, plan.first, plan, 8)

    row["block_scores_ms"] = _ms(scores)
    ranked, c_scores = scores()
    m = torch.full((1, 8, plan.num_chunks), cfg.sample_size, device="cuda")

    def select():
        g = ker_sel.gather_columns(plan, c_scores, heavy, m, cfg.sample_size, cfg.num_sinks, cfg.sample_mix, 0,
                                   kv_heads)
        e = S.exact_blocks(plan, blocks, ranked, torch.full_like(blocks, cfg.key_blocks))
        return S.Selection(blocks, e, torch.ones_like(blocks, dtype=torch.bool), *g)

    row["select_ms"] = _ms(select)
    sel = select()
    row["attend_ms"] = _ms(lambda: ker.attend(q, k, v, scale, plan, sel, lsh))
    if flex:
        row["attend_flex_ms"] = _ms(lambda: ker.attend_flex(q, k, v, scale, plan, sel, lsh))
        # Each pass of the attention step alone, and the merge.
        bits = ker._exact_bits(plan, sel)
        row["bits_ms"] = _ms(lambda: ker._exact_bits(plan, sel))
        row["block_pass_ms"] = _ms(lambda: ker.block_pass(q, k, v, scale, plan, sel, bits))
        row["gathered_pass_ms"] = _ms(lambda: ker.gathered_pass(q, k, v, scale, plan, sel, lsh))
        row["lsh_pass_ms"] = _ms(lambda: ker.lsh_pass(q, k, v, scale, plan, lsh, bits))
        o1, l1 = ker.block_pass(q, k, v, scale, plan, sel, bits)
        o2, l2 = ker.gathered_pass(q, k, v, scale, plan, sel, lsh)
        from hyperattn.reference.exact import merge_lse
        row["merge_ms"] = _ms(lambda: merge_lse(o1.float(), l1, o2.float(), l2))
    row["call_ms"] = _ms(lambda: ha.hyper_attention(q, k, v, causal=causal, config=cfg))
    row[f"call_{_SPAN_NAME}_ms"] = _ms(lambda: ha.hyper_attention(q, k, v, causal=causal,
                                                                  config=cfg.replace(heavy_span=_SPAN)))
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            ha.hyper_attention(q, k, v, causal=causal, config=cfg)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        events = prof.key_averages()
        # Kernels are the events with device time of their own (the ops above them have none).
        kernels = [e for e in events if e.self_device_time_total > 0]
        row["kernels_total_ms"] = sum(e.self_device_time_total for e in kernels) / 1000
        row["kernel_launches"] = sum(e.count for e in kernels)
    if n <= 131072:  # longer: the bench extrapolates SDPA quadratically (minutes per call)
        kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            row["sdpa_cudnn_ms"] = _ms(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=causal))
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--json")
    parser.add_argument("--profile", action="store_true", help="print a CUDA kernel profile of one call")
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention's engine and its passes")
    args = parser.parse_args()
    rows = []
    for n in args.lengths:
        rows.append(breakdown(n, profile=args.profile, flex=args.flex))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "versions": versions(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
