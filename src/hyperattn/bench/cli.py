"""``hyperattn bench``: forward (``--backward``: forward+backward) timings against SDPA and FlexAttention.

Table, JSON, PNG.

On CUDA the defaults are the issue's protocol: lengths 4k to 1M, B1, Hq32/Hkv8, D128,
bf16, causal and non-causal, every implementation. On a CPU: short lengths, small heads,
fp32, the reference ("hyper") against SDPA's math backend.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cli_args import positive_float, positive_int, writable_file
from .forward import IMPLS

__all__ = ["add_arguments", "run", "format_table"]

_CUDA_LENGTHS = [1 << p for p in range(12, 21)]
_CPU_LENGTHS = [1024, 2048, 4096]
# Lengths past which a row is skipped by default: the quadratic baselines take seconds per
# call there (their time is extrapolated quadratically in the table instead).
# The guarded structured method runs random inputs' heads exactly (see IMPLS), as slow as SDPA.
_DEFAULT_MAX_N = {"hyper-reference": 131072, "structured": 262144, "sdpa-efficient": 131072, "sdpa-cudnn": 262144,
                  "sdpa-flash": 262144, "sdpa-math": 16384}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=positive_int, nargs="+", help="sequence lengths (default: 4096..1048576 "
                        "on CUDA, 1024 2048 4096 on CPU)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="implementations (default: all on CUDA "
                        "except sdpa-math; hyper and sdpa-math on CPU)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="masking (default both)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, help="query heads (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--kv-heads", type=positive_int, help="key/value heads, a divisor of --heads (default 8 "
                        "on CUDA, 2 on CPU)")
    parser.add_argument("--head-dim", type=positive_int, help="head dim (default 128 on CUDA, 64 on CPU)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="input dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--max-n", nargs="*", default=[], metavar="IMPL=N",
                        help="skip an implementation above N (defaults: " +
                             ", ".join(f"{k}={v}" for k, v in _DEFAULT_MAX_N.items()) + ")")
    parser.add_argument("--flex-lengths", type=positive_int, nargs="*", default=[32768, 131072, 1048576],
                        help="lengths at which flex-sink-window runs (each compiles once; default 32768 131072 "
                             "1048576)")
    parser.add_argument("--min-seq-len", type=positive_int, metavar="N",
                        help="min_seq_len of the structured rows (default: structured the method's own, the "
                             "crossover on CUDA; structured-fixed 4096), e.g. to time the guard below the crossover")
    parser.add_argument("--budget-ms", type=positive_float, default=400.0, help="timing budget per row (default 400)")
    parser.add_argument("--backward", action="store_true",
                        help="time forward+backward (gradients of q, k, v) instead of the forward; rows carry "
                             "\"backward\": true and speed-ups are to SDPA's fastest forward+backward")
    parser.add_argument("--profile", type=positive_int, nargs="*", metavar="N",
                        help="also profile the CUDA path of method='hyper' at these lengths (stage breakdown; "
                             "with --backward, of forward+backward)")
    parser.add_argument("--json", metavar="PATH", type=writable_file, help="write the results file here")
    parser.add_argument("--plot", metavar="PNG", type=writable_file, help="write a log-log plot here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fastest_sdpa(rows: list[dict], n: int, causal: bool, backward: bool = False) -> tuple[float | None, bool]:
    """Fastest SDPA time at ``n`` (forward, or forward+backward): measured, or extrapolated quadratically
    from the longest measured length."""
    sdpa = [r for r in rows if r["impl"].startswith("sdpa-") and r["causal"] == causal and r["ms"] is not None
            and r.get("backward", False) == backward]
    here = [r["ms"] for r in sdpa if r["n"] == n]
    if here:
        return min(here), False
    below = [r for r in sdpa if r["n"] < n]
    if not below:
        return None, False
    longest = max(r["n"] for r in below)
    best = min(r["ms"] for r in below if r["n"] == longest)
    return best * (n / longest) ** 2, True


def format_table(results: dict) -> str:
    """A text table: ms, speed-up over the fastest SDPA backend (``~``: extrapolated), rates, memory."""
    from .forward import BACKWARD_WORK, exact_pairs

    shape = results["shape"]
    lines = [f"{results['device']} | torch {results['torch']} | triton {results['triton']} | B{shape['batch']} "
             f"Hq{shape['heads']} Hkv{shape['kv_heads']} D{shape['head_dim']} {shape['dtype']}",
             f"{'causal':>6} {'n':>8} {'impl':<17} {'pass':>7} {'ms':>10} {'vs sdpa':>9} {'eff TF/s':>9} "
             f"{'TF/s':>7} {'peak GB':>8}"]
    rows = results["rows"]
    for row in sorted(rows, key=lambda r: (r.get("backward", False), not r["causal"], r["n"], r["impl"])):
        backward = row.get("backward", False)
        mode = "fwd+bwd" if backward else "fwd"
        if row["ms"] is None:
            lines.append(f"{str(row['causal']):>6} {row['n']:>8} {row['impl']:<17} {mode:>7} {row.get('error', '')}")
            continue
        sdpa, extrapolated = _fastest_sdpa(rows, row["n"], row["causal"], backward)
        speedup = "" if sdpa is None else f"{'~' if extrapolated else ''}{sdpa / row['ms']:.1f}x"
        eff = 4 * shape["head_dim"] * exact_pairs(row["n"], row["causal"]) * shape["batch"] * shape["heads"]
        eff *= BACKWARD_WORK if backward else 1.0
        eff = eff / (row["ms"] * 1e-3) / 1e12
        peak = "" if row["peak_gb"] is None else f"{row['peak_gb']:.2f}"
        lines.append(f"{str(row['causal']):>6} {row['n']:>8} {row['impl']:<17} {mode:>7} {row['ms']:>10.3f} "
                     f"{speedup:>9} "
                     f"{eff:>9.4g} {row.get('tflops', 0.0):>7.4g} {peak:>8}")
    return "\n".join(lines)


def _refuse(message: str) -> int:
    print(f"hyperattn bench: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import torch

    from .forward import BenchShape, profile_hyper, run_forward_bench

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = BenchShape(batch=args.batch, heads=args.heads or (32 if cuda else 8),
                       kv_heads=args.kv_heads or (8 if cuda else 2), head_dim=args.head_dim or (128 if cuda else 64),
                       dtype=args.dtype or ("bfloat16" if cuda else "float32"))
    lengths = args.lengths or (_CUDA_LENGTHS if cuda else _CPU_LENGTHS)
    impls = args.impls or ([i for i in IMPLS if i != "sdpa-math"] if cuda else ["hyper", "sdpa-math"])
    if not cuda:
        impls = [i for i in impls if i in ("hyper", "hyper-reference", "structured", "structured-fixed", "sdpa-math")]
    modes = {"both": [True, False], "yes": [True], "no": [False]}[args.causal]
    if shape.heads % shape.kv_heads:
        return _refuse(f"--kv-heads: expected a divisor of --heads = {shape.heads}, got {shape.kv_heads}")
    max_n = dict(_DEFAULT_MAX_N)
    for item in args.max_n:
        name, _, value = item.partition("=")
        if name not in IMPLS or not value.isdigit():
            return _refuse(f"--max-n: expected IMPL=N with IMPL in {IMPLS}, got {item!r}")
        max_n[name] = int(value)
    def save(partial: dict) -> None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(partial, fh, indent=1)

    results = run_forward_bench(lengths, impls, modes, shape, device, max_n=max_n,
                                only={"flex-sink-window": set(args.flex_lengths)}, budget_ms=args.budget_ms,
                                progress=not args.no_progress, on_row=save, backward=args.backward,
                                min_seq_len=args.min_seq_len)
    if args.profile and cuda:
        results["profile"] = [profile_hyper(n, causal, shape, device, backward=args.backward)
                              for n in args.profile for causal in modes]
    print(format_table(results))
    for prof in results.get("profile", []):
        stages = ", ".join(f"{k} {v:.2f}" for k, v in prof["stages_ms"].items())
        what = "fwd+bwd" if prof.get("backward") else "fwd"
        print(f"profile n={prof['n']} causal={prof['causal']} {what}: total {prof['total_ms']:.2f} ms ({stages})")
    save(results)
    if args.plot:
        from .plot import plot_results

        plot_results(results, args.plot)
    return 0
