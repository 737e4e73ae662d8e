"""Log-log plot of a results file: time against sequence length, one panel per masking mode."""

from __future__ import annotations

__all__ = ["plot_results"]


def plot_results(results: dict, path: str) -> None:
    """Write a PNG of ``ms`` against ``n`` (log-log) for every implementation in ``results``.

    Examples::

        >>> plot_results({"device": "cpu", "torch": "2", "triton": None, "rows": [
        ...     {"n": 1024, "causal": True, "impl": "hyper", "ms": 1.0}]}, "/tmp/bench.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One panel per (pass, masking): forward and forward+backward times are never on one axis.
    modes = sorted({(row.get("backward", False), row["causal"]) for row in results["rows"]},
                   key=lambda m: (m[0], not m[1]))
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    for ax, (backward, causal) in zip(axes[0], modes):
        rows = [r for r in results["rows"] if r["causal"] == causal and r.get("backward", False) == backward
                and r.get("ms") is not None]
        label = "forward+backward" if backward else "forward"
        for impl in dict.fromkeys(r["impl"] for r in rows):
            points = sorted((r["n"], r["ms"]) for r in rows if r["impl"] == impl)
            style = "-o" if impl.startswith("hyper") else "--s" if impl.startswith("sdpa") else ":^"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=impl, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(f"{label} time (ms)")
        ax.set_title(("causal" if causal else "non-causal") + " " + label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    shape = results.get("shape", {})
    fig.suptitle(f"{results['device']} · torch {results['torch']} · triton {results.get('triton')} · "
                 f"B{shape.get('batch')} Hq{shape.get('heads')} Hkv{shape.get('kv_heads')} "
                 f"D{shape.get('head_dim')} {shape.get('dtype')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
