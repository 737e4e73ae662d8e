"""Key blocks by score or by cumulative mass, at equal keys/query, on captured heads (CPU reference).

    hyperattn capture caps.pt --text argparse --layers 0,3,5,8,14,18,20,25,29
    python benchmarks/block_choice.py caps.pt --json out.json

Each query block of the structured default attends its window and some of its best key
blocks by pooled score (``reference.selection.block_scores``). Two rules pick how many:

- ``score``: the ``k`` best, the same ``k`` for every block (the default: ``key_blocks=4``);
- ``mass``: the fewest best blocks whose scores hold a share ``tau`` of the block's pooled
  mass over its candidates (XAttention's and FlexPrefill's rule), at most ``--max-blocks``.

Everything else is the default's, the guard off (``max_error=None``) so both rules spend
their budget as chosen: sinks, heavy columns, residual samples and each row's LSH block.
For each rule value the script reports, per layer, the mean over heads of the output's
relative error on the rows from ``min_seq_len`` on and the keys scored per query there;
comparing the rules is comparing their error at equal keys/query.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import hyperattn as ha
from hyperattn.eval.capture import load_capture
from hyperattn.eval.metrics import relative_error
from hyperattn.methods.structured import _keys_per_row
from hyperattn.reference import selection as S
from hyperattn.reference import structured as R
from hyperattn.reference.exact import attention_lse


def mass_counts(scores: torch.Tensor, tau: float, max_blocks: int) -> torch.Tensor:
    """Per query block ``(B, Hq, c)``: the fewest best candidates whose scores reach ``tau`` of their sum, ``<= max_blocks``."""
    mass = scores.clamp(min=0)
    top = mass.topk(min(max_blocks, mass.shape[-1]), dim=-1).values
    # Blocks before the share is reached, plus the one that reaches it.
    count = (top.cumsum(-1) < tau * mass.sum(-1, keepdim=True)).sum(-1) + 1
    return torch.where(mass.sum(-1) > 0, count.clamp(max=top.shape[-1]), 0)


def approximate(q, k, v, scale: float, cfg, rule: str, value: float, max_blocks: int, seed: int = 0):
    """The default's selection (guard off) with the key blocks picked by ``rule``: ``out`` of the approximate rows, keys/query there."""
    bsz, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    plan = S.make_plan(nq, nk, True, cfg.query_block, cfg.window, cfg.chunk, cfg.min_seq_len, q.device)
    heads, kv_heads = torch.arange(hq), torch.arange(hkv)
    pb = cfg.probe_blocks
    probe = S.probe_rows(plan, seed, bsz, heads, pb, max(1, math.ceil(cfg.probe_rows / pb)))
    _, _, heavy, _ = S.probe_exact(q, k, v, scale, plan, probe, cfg.heavy_columns, cfg.num_sinks, pb, need_out=False,
                                   span=cfg.heavy_span)
    blocks = torch.arange(plan.first, plan.nqb).expand(bsz, hq, -1)
    scores = S.block_scores(S.pool(q, k, plan, cfg.score_group), scale, plan, blocks)
    ranked = S.rank_blocks(scores, max_blocks)
    m = min(cfg.sample_size, nk)
    g_idx, g_logw = S.gather_columns(plan, S.chunk_scores(scores, plan.first, plan, hkv), heavy,
                                     torch.full((bsz, hkv, plan.num_chunks), m), m, cfg.num_sinks, cfg.sample_mix,
                                     seed, kv_heads)
    lsh = S.lsh_ranges(q, k, plan, cfg.lsh_block, cfg.lsh_num_projs, seed)
    kj = torch.full(blocks.shape, int(value)) if rule == "score" else mass_counts(scores, value, max_blocks)
    sel = S.Selection(blocks, S.exact_blocks(plan, blocks, ranked, kj), torch.ones_like(blocks, dtype=torch.bool),
                      g_idx, g_logw)
    out, _ = R.attend(q, k, v, scale, plan, sel, lsh)
    keys = _keys_per_row(plan, sel, lsh, None).sum(-1).double() / out.shape[2]
    return out, keys, float(kj.float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capture", help="a file of `hyperattn capture`")
    parser.add_argument("--scores", type=int, nargs="*", default=[3, 4, 5, 6], help="k values of the score rule")
    parser.add_argument("--taus", type=float, nargs="*", default=[0.5, 0.6, 0.7, 0.8, 0.9],
                        help="mass shares of the mass rule")
    parser.add_argument("--max-blocks", type=int, default=16, help="the mass rule's cap on key blocks per query block")
    parser.add_argument("--min-seq-len", type=int, default=1024, help="rows approximated from here (default 1024, "
                                                                       "as hyperattn eval)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    cap = load_capture(args.capture)
    cfg = ha.HyperAttentionConfig(max_error=None, min_seq_len=args.min_seq_len)
    runs = [("score", float(x)) for x in args.scores] + [("mass", x) for x in args.taus]
    rows = []
    for layer, (q, k, v) in sorted(cap.layers.items()):
        q, k, v = q.float(), k.float(), v.float()
        ref, _ = attention_lse(q, k, v, cap.scale, True)
        for rule, value in runs:
            out, keys, blocks = approximate(q, k, v, cap.scale, cfg, rule, value, args.max_blocks)
            err = relative_error(out, ref[:, :, q.shape[2] - out.shape[2]:])
            rows.append({"layer": layer, "rule": rule, "value": value, "mean_error": float(err.mean()),
                         "max_error": float(err.max()), "keys_per_query": float(keys.mean()),
                         "key_blocks_mean": blocks})
            print(f"layer {layer:2d} {rule:5s} {value:4g}: error {err.mean():.4f} (max {err.max():.4f}), "
                  f"{keys.mean():.0f} keys/query, {blocks:.2f} key blocks", flush=True)
    summary = {}
    for rule, value in runs:
        mine = [r for r in rows if r["rule"] == rule and r["value"] == value]
        summary[f"{rule}={value:g}"] = {"mean_error": sum(r["mean_error"] for r in mine) / len(mine),
                                        "worst_layer": max(r["mean_error"] for r in mine),
                                        "keys_per_query": sum(r["keys_per_query"] for r in mine) / len(mine)}
    # At equal keys: each mass row against the score rule's error at its keys/query on the
    # same layer, linear between the two score rows around it (none outside their range).
    for row in rows:
        if row["rule"] != "mass":
            continue
        curve = sorted((r["keys_per_query"], r["mean_error"]) for r in rows
                       if r["rule"] == "score" and r["layer"] == row["layer"])
        row["score_error_at_equal_keys"] = next(
            (e0 + (e1 - e0) * (row["keys_per_query"] - k0) / (k1 - k0)
             for (k0, e0), (k1, e1) in zip(curve, curve[1:]) if k0 <= row["keys_per_query"] <= k1), None)
    for tau in args.taus:
        pairs = [(r["mean_error"], r["score_error_at_equal_keys"]) for r in rows
                 if r["rule"] == "mass" and r["value"] == tau and r["score_error_at_equal_keys"] is not None]
        if pairs:
            summary[f"mass={tau:g}"]["vs_score_at_equal_keys"] = {
                "layers": len(pairs), "mass_error": sum(a for a, _ in pairs) / len(pairs),
                "score_error": sum(b for _, b in pairs) / len(pairs)}
    for name, s in summary.items():
        print(f"{name:10s} mean error {s['mean_error']:.4f}, worst layer {s['worst_layer']:.4f}, "
              f"{s['keys_per_query']:.0f} keys/query" + (
                  " | at equal keys on {layers} layers: mass {mass_error:.4f}, score {score_error:.4f}".format(
                      **s["vs_score_at_equal_keys"]) if "vs_score_at_equal_keys" in s else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"capture": cap.meta, "min_seq_len": args.min_seq_len, "max_blocks": args.max_blocks,
                       "config": repr(cfg), "rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
