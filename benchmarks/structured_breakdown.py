"""Where the time of the structured method's CUDA path goes, per stage.

    python benchmarks/structured_breakdown.py --lengths 32768 131072 --json out.json

Random bf16 inputs (B 1, Hq 32, Hkv 8, D 128, causal), fixed budget (``max_error=None``,
the cost of the path the guard takes on real heads). Stages, each timed alone with CUDA
events (median of ``--repeats``): the whole call; the selection of every query block
(heavy columns, block scores, exact sets, LSH blocks, samples) with a no-op attention; the
heavy-column search alone; the attention kernel on a precomputed selection of every block.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics

import torch

import hyperattn as ha
from hyperattn.bench.forward import versions
from hyperattn.kernels.structured import _BlockAttention, structured_block_attention
from hyperattn.reference import structured as ref


def _time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _no_attention(q, k, v, scale, causal, r0, qb, sel, ctx):
    shape = (q.shape[0], q.shape[1], len(sel.blocks), qb)
    return q.new_zeros(*shape, q.shape[-1], dtype=torch.float32), q.new_zeros(*shape, dtype=torch.float32)


_no_attention.chunk_elements = _BlockAttention.chunk_elements
_no_attention.rows_times_keys = False
_no_attention.block_scores = _BlockAttention.block_scores


def breakdown(n: int, repeats: int, profile: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = 128 ** -0.5
    cfg = ha.HyperAttentionConfig(seed=0, max_error=None)
    budget = ref.budget_from_config(cfg)
    row = {"n": n}
    _, stats = ha.hyper_attention(q, k, v, causal=True, config=cfg, return_stats=True)
    row["keys_per_query"] = stats.keys_per_query
    row["call_ms"] = _time(lambda: ha.hyper_attention(q, k, v, causal=True, config=cfg), repeats)
    row["guarded_call_ms"] = _time(lambda: ha.hyper_attention(q, k, v, causal=True,
                                                              config=ha.HyperAttentionConfig(seed=0)), repeats)
    row["selection_ms"] = _time(lambda: ref.structured_run(q, k, v, scale, True, budget, 0, None, ha.AttentionStats,
                                                           attend=_no_attention), repeats)
    r0 = ref.first_approx_row(n, n, True, budget.min_seq_len)
    nb = math.ceil((n - r0) / budget.query_block)
    draws = ref.draw_structured(0, 128, 1, 32, nb, budget, "cuda")
    row["heavy_ms"] = _time(lambda: ref.heavy_columns(q, k, scale, True, budget, draws, r0), repeats)
    heavy, _ = ref.heavy_columns(q, k, scale, True, budget, draws, r0)
    sorted_comp, order = ref.sort_keys_by_bucket(k, draws.proj)
    sel, _ = ref.select_blocks(q, k, scale, True, budget, draws, r0, torch.arange(nb), heavy,
                               ref.pool_keys(k.float(), budget.key_block), (sorted_comp.repeat_interleave(4, 1), order))
    row["kernel_ms"] = _time(lambda: structured_block_attention(q, k, v, scale, True, r0, budget.query_block, sel),
                             repeats)
    # Marginal costs: the main pass alone (no LSH blocks), then without the samples too.
    no_lsh = dataclasses.replace(sel, lsh_idx=None, lsh_ok=None)
    row["kernel_no_lsh_ms"] = _time(lambda: structured_block_attention(q, k, v, scale, True, r0, budget.query_block,
                                                                      no_lsh), repeats)
    exact_only = dataclasses.replace(no_lsh, sample_idx=sel.sample_idx[..., :0], sample_logw=sel.sample_logw[..., :0])
    row["kernel_exact_set_only_ms"] = _time(lambda: structured_block_attention(q, k, v, scale, True, r0,
                                                                              budget.query_block, exact_only), repeats)
    row["exact_set_mean"] = float((sel.exact_idx < ref._BIG).sum(-1).float().mean())
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=True) as prof:
            ref.structured_run(q, k, v, scale, True, budget, 0, None, ha.AttentionStats, attend=_no_attention)
            torch.cuda.synchronize()
        print(prof.key_averages(group_by_stack_n=4).table(sort_by="self_cuda_time_total", row_limit=40,
                                                              max_name_column_width=50, max_src_column_width=90),
              flush=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        row["sdpa_cudnn_ms"] = _time(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), repeats)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--profile", type=int, nargs="*", default=[], help="lengths whose selection is profiled")
    args = parser.parse_args()
    rows = [breakdown(n, args.repeats, n in args.profile) for n in args.lengths]
    result = {"device": torch.cuda.get_device_name(), **versions(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
