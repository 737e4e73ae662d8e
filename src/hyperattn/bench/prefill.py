"""End-to-end prefill of a Llama-3-8B-shaped model: ``"sdpa"`` against ``attn_implementation="hyper"``.

Run as ``python -m hyperattn.bench.prefill --out PATH.json`` on one GPU. The model is
built from its config with random weights in bf16 directly on the device (no download,
no CPU init), and one sequence is prefilled (``use_cache=False``, logits of the last token
only) at each length, for every implementation:

- ``sdpa``: transformers' SDPA path (``F.scaled_dot_product_attention``, GQA native);
- ``hyper``: every layer through :mod:`hyperattn.integrations.hf`;
- ``hyper-last-half``: the last half of the layers, the rest SDPA.

Each hyper row runs once per method: ``"hyper"`` (the paper's method, Triton kernels on
CUDA) and the package default configuration (whatever ``HyperAttentionConfig()`` is:
``"structured"``, which has its own CUDA path: PyTorch selection, Triton attention).
Timing: one warm-up call (Triton compiles and autotunes per shape), then CUDA-event
timings of ``reps`` calls, median reported; peak memory of the first timed call, weights
included. Results are written after every row, so a run cut short still leaves data.

Results file (stable schema, one JSON object)::

    {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
     "transformers": "5.17.0", "hyperattn_commit": "abc1234" | null,
     "model": {"name": "llama3-8b", "layers": 32, "hidden": 4096, ..., "dtype": "bfloat16"},
     "rows": [{"n": 131072,
               "impl": "sdpa" | "hyper" | "hyper-last-half",
               "method": null | "hyper" | "paper-plan" | "default" | "structured-fixed",
               "config": {...} | null,                    # its HyperAttentionConfig fields
               "ms": 1234.5 | null,                       # median prefill time; null: failed/skipped
               "reps": 3, "peak_gb": 40.1 | null,
               "error": "..."}]}                          # only on failed or skipped rows

Speed-up of a row = ``ms`` of the ``sdpa`` row of the same ``n`` / its ``ms``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..config import HyperAttentionConfig
from .forward import PAPER_PLAN_CONFIG, time_once_ms, versions

__all__ = ["MODELS", "IMPLS", "build_model", "run_prefill_bench", "plot_prefill", "main"]

#: Model shapes the benchmark builds. ``llama3-8b`` is Meta-Llama-3-8B's config (128k
#: context as in Llama 3.1); ``tiny`` is for checking the script on a CPU.
MODELS = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=131072),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=1024, rope_theta=500000.0, max_position_embeddings=131072),
}
#: Implementations (the ``impl`` of a row).
IMPLS = ("sdpa", "hyper", "hyper-last-half")
#: Methods the hyper rows run with: the paper's method, the authors' code's recursion plan
#: (see :data:`hyperattn.bench.forward.PAPER_PLAN_CONFIG`), the package default, and the
#: default's budget without the guard (the forward benchmark's ``structured-fixed``).
METHOD_CONFIGS = {"hyper": HyperAttentionConfig(method="hyper"),
                  "paper-plan": PAPER_PLAN_CONFIG,
                  "default": HyperAttentionConfig(),
                  "structured-fixed": HyperAttentionConfig(seed=0, max_error=None, min_seq_len=4096)}


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """A ``LlamaForCausalLM`` of shape ``MODELS[name]`` with random weights, built on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config_dict(config: HyperAttentionConfig) -> dict:
    return {**dataclasses.asdict(config), "min_seq_len": config.effective_min_seq_len}


def _header(model_name: str, device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    return {**versions(device), "transformers": transformers.__version__,
            "model": {"name": model_name, **MODELS[model_name], "dtype": str(dtype).removeprefix("torch."),
                      "weights": "random"},
            "rows": []}


def _estimate_ms(rows: list[dict], impl: str, method: str | None, n: int) -> float | None:
    """Projected time of a row from the same implementation at a shorter length (quadratic for sdpa, else linear)."""
    done = [r for r in rows if r["impl"] == impl and r["method"] == method and r["ms"] is not None and r["n"] < n]
    if not done:
        return None
    last = max(done, key=lambda r: r["n"])
    power = 2 if impl == "sdpa" or method == "default" else 1
    return last["ms"] * (n / last["n"]) ** power


def run_prefill_bench(model_name: str = "llama3-8b", lengths=(32768, 65536, 131072), reps: int = 3,
                      time_budget_s: float = 360.0, out: str | None = None, methods=("hyper", "default"),
                      device: str | None = None) -> dict:
    """Time one-sequence prefill for every implementation and length; returns the results dict.

    Args:
        model_name: a key of :data:`MODELS`. Default ``"llama3-8b"``.
        lengths: prompt lengths. Default 32k, 64k, 128k.
        reps: timed calls per row after one warm-up; the median is reported. Default 3.
        time_budget_s: rows whose projected time (warm-up + reps, from the same row at a
            shorter length) would pass this many seconds since the start are skipped
            with an ``error``. Default 360.
        out: JSON path rewritten after every row; None writes nothing.
        methods: which of :data:`METHOD_CONFIGS` the hyper rows run. Default ``hyper`` and ``default``.
        device: default ``"cuda"`` if available, else ``"cpu"`` (bf16 on CUDA, fp32 on CPU).

    Returns:
        The results dict described in the module docstring.

    Examples::

        >>> from hyperattn.bench.prefill import run_prefill_bench
        >>> res = run_prefill_bench("tiny", lengths=[256], reps=1, methods=["hyper"])  # doctest: +SKIP
        >>> sorted({row["impl"] for row in res["rows"]})  # doctest: +SKIP
        ['hyper', 'hyper-last-half', 'sdpa']
    """
    from ..integrations import hf

    start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = _header(model_name, dev, dtype)
    model = build_model(model_name, dev, dtype)
    num_layers = model.config.num_hidden_layers
    results["build_s"] = round(time.perf_counter() - start, 1)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def save() -> None:
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(results, indent=2) + "\n")

    plan = [(impl, None) for impl in ("sdpa",)]
    plan += [(impl, method) for method in methods for impl in ("hyper", "hyper-last-half")]
    # The paper's method first at every length, the default method (possibly unkerneled) last.
    order = [(n, impl, method) for method in dict.fromkeys(m for _, m in plan) for n in lengths
             for impl, m in plan if m == method]
    for n, impl, method in order:
        row = {"n": n, "impl": impl, "method": method,
               "config": None if method is None else _config_dict(METHOD_CONFIGS[method]), "ms": None,
               "reps": 0, "peak_gb": None}
        estimate = _estimate_ms(results["rows"], impl, method, n)
        elapsed = time.perf_counter() - start
        if estimate is not None and elapsed + estimate * (reps + 1) / 1e3 > time_budget_s:
            row["error"] = (f"skipped: projected {estimate / 1e3:.1f} s per call would pass the "
                            f"{time_budget_s:.0f} s budget")
            results["rows"].append(row)
            save()
            continue
        if impl == "sdpa":
            hf.disable(model)
        else:
            layers = None if impl == "hyper" else range(num_layers // 2, num_layers)
            hf.enable(model, hf.HyperPolicy(config=METHOD_CONFIGS[method], layers=layers))
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen).to(dev)

        def prefill():
            with torch.inference_mode():
                return model(ids, use_cache=False, logits_to_keep=1).logits

        try:
            prefill()  # warm-up: Triton compilation and autotuning for this shape
            _sync(dev)
            times = []
            for rep in range(reps):
                if dev.type == "cuda" and rep == 0:
                    torch.cuda.reset_peak_memory_stats(dev)
                times.append(time_once_ms(prefill, dev.type == "cuda"))
                if dev.type == "cuda" and rep == 0:
                    row["peak_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                if time.perf_counter() - start > time_budget_s:
                    break
            row["ms"], row["reps"] = round(statistics.median(times), 2), len(times)
        except Exception as exc:  # a failed row (out of memory, no kernel) is data; the next rows still run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        finally:
            del ids
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        results["rows"].append(row)
        save()
        print(json.dumps(row), flush=True)
    hf.disable(model)
    results["total_s"] = round(time.perf_counter() - start, 1)
    save()
    return results


def plot_prefill(results: dict, path: str) -> None:
    """Write a PNG: prefill time per length, one bar per implementation and method, speed-up over sdpa on top.

    Examples::

        >>> plot_prefill({"device": "cpu", "torch": "2", "model": {"name": "tiny"}, "rows": [
        ...     {"n": 256, "impl": "sdpa", "method": None, "ms": 2.0}]}, "/tmp/prefill.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    lengths = sorted({r["n"] for r in rows})
    series = list(dict.fromkeys((r["impl"], r["method"]) for r in rows))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (impl, method) in enumerate(series):
        label = impl if method is None else f"{impl} ({method})"
        for j, n in enumerate(lengths):
            row = next((r for r in rows if (r["impl"], r["method"], r["n"]) == (impl, method, n)), None)
            if row is None:
                continue
            x = j + (i - (len(series) - 1) / 2) * width
            base = next((r["ms"] for r in rows if r["impl"] == "sdpa" and r["n"] == n), None)
            if row["ms"] is None:
                reason = "out of memory" if "OutOfMemory" in row.get("error", "") else "failed"
                ax.bar(x, 0, width, color=f"C{i}", label=label)
                ax.text(x, 0, reason, ha="center", va="bottom", fontsize=7, rotation=90, color=f"C{i}")
                continue
            ax.bar(x, row["ms"] / 1e3, width, color=f"C{i}", label=label)
            if base is not None and impl != "sdpa":
                ax.text(x, row["ms"] / 1e3, f"{base / row['ms']:.1f}x", ha="center", va="bottom", fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlim(-0.5, len(lengths) - 0.5)
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_xlabel("prompt length")
    ax.set_ylabel("prefill time (s)")
    model = results.get("model", {})
    ax.set_title(f"{model.get('name')} prefill, random weights · {results['device']} · torch {results['torch']}",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperattn.bench.prefill", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results JSON (rewritten after every row)")
    parser.add_argument("--png", help="plot path (default: --out with .png)")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--reps", type=int, default=3, help="timed calls per row after one warm-up (default 3)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHOD_CONFIGS), default=["hyper", "default"],
                        help="methods of the hyper rows (default: hyper default)")
    parser.add_argument("--time-budget", type=float, default=360.0, help="seconds; later rows are skipped when "
                        "their projected time would pass it (default 360)")
    parser.add_argument("--device", help="default cuda if available, else cpu")
    parser.add_argument("--replot", action="store_true", help="only redraw --png from an existing --out")
    args = parser.parse_args(argv)
    png = args.png or str(Path(args.out).with_suffix(".png"))
    if args.replot:
        plot_prefill(json.loads(Path(args.out).read_text()), png)
        return 0
    if args.reps < 1 or any(n < 1 for n in args.lengths):
        parser.error("--reps and --lengths must be positive")
    results = run_prefill_bench(args.model, args.lengths, args.reps, args.time_budget, args.out, args.methods,
                                args.device)
    plot_prefill(results, png)
    failed = [r for r in results["rows"] if r["ms"] is None]
    return 1 if failed and len(failed) == len(results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
