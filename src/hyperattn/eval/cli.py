"""``hyperattn eval``: attention error per layer and perplexity on the embedded SmolLM2.

With no arguments: the embedded SmolLM2-135M on the first 4,096 tokens of the
standard-library ``argparse`` source, exact attention against the package default
(``method="structured"``), on a representative handful of layers (every 6th and the
last: 0, 6, 12, 18, 24, 29), for both the error table and the perplexity pass, which
keeps a first run on a 2-core CPU within a few minutes. ``--all-layers`` is the full
measurement of the committed tables: all 30 layers on 8,192 tokens (meant for a GPU,
``--device cuda``, where it should take about a minute; 11 minutes on a 2-core CPU).

1. One exact forward pass records every layer's post-RoPE Q/K/V
   (:mod:`hyperattn.eval.capture`) and gives the exact perplexity.
2. Per layer and method, the output error per head ``||O - O_exact||_F / ||O_exact||_F``
   (DESIGN.md §5) over ``--rows`` random query rows at positions ``>= --min-row`` (whole
   blocks of 64; rows before 1024 are exact by construction for every method). Each
   method's output on those rows is identical to its full call's; ``keys/query`` is the
   full call's average number of scored keys per query (``stats.keys_per_query``).
3. Perplexity with the method in the layers given by ``--layers`` (default all), through
   :mod:`hyperattn.integrations.hf`.

Methods are given as ``NAME`` or ``NAME:field=value,...`` with fields of
:class:`~hyperattn.config.HyperAttentionConfig`; the names are presets (:data:`PRESETS`).

``hyperattn eval --passkey`` instead runs the passkey retrieval check
(:mod:`hyperattn.eval.passkey`): a passkey sentence planted at each of ``--depths`` of a
``--tokens``-long prompt, asked for at the end, per method (default ``exact structured
streaming``; ``exact`` is transformers' SDPA): greedy answer right or wrong, and the
teacher-forced log-probability of the passkey digits.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from ..config import HyperAttentionConfig

__all__ = ["PRESETS", "default_layers", "parse_method", "evaluate", "add_arguments", "run"]

#: Preset configurations; budgets of the peers sized to ~1000 keys per query at 8k causal.
#: Every preset fixes ``min_seq_len`` (1024, the first measured row; the paper's 4096 for
#: "hyper"), so the eval measures the approximation, not a device's crossover default.
PRESETS: dict[str, dict] = {
    "structured": {"min_seq_len": 1024},
    "hyper": {"method": "hyper", "min_seq_len": 4096},
    "hyper1024": {"method": "hyper", "min_seq_len": 1024},
    "streaming": {"method": "streaming", "num_sinks": 16, "window": 1008, "min_seq_len": 1024},
    "vertical_slash": {"method": "vertical_slash", "num_sinks": 16, "heavy_columns": 240, "window": 704,
                       "min_seq_len": 1024},
    "block_topk": {"method": "block_topk", "key_blocks": 14, "min_seq_len": 1024},
    "oracle_topk": {"method": "oracle_topk", "block_size": 512, "sample_size": 512, "min_seq_len": 1024},
}


def default_layers(num_layers: int) -> list[int]:
    """The representative handful measured by default: every 6th layer and the last.

    Examples::

        >>> default_layers(30)
        [0, 6, 12, 18, 24, 29]
    """
    return sorted(set(range(0, num_layers, 6)) | {num_layers - 1})

#: Where ``hyperattn eval`` writes its plot unless told otherwise.
DEFAULT_PLOT = "hyperattn-eval.png"
#: Tokens of the default run (a first run in minutes on a 2-core CPU) and of ``--all-layers``
#: and ``--passkey`` (the committed measurements).
DEFAULT_TOKENS = 4096
FULL_TOKENS = 8192

_FIELD_TYPES = {"max_error": float, "sample_mix": float, "method": str}


def parse_method(spec: str, seed: int) -> tuple[str, HyperAttentionConfig]:
    """``"hyper:min_seq_len=1024"`` -> (label, config); ValueError naming ``--methods`` on a bad spec.

    Examples::

        >>> label, cfg = parse_method("oracle_topk:block_size=256", seed=0)
        >>> label, cfg.method, cfg.block_size, cfg.sample_size
        ('oracle_topk:block_size=256', 'oracle_topk', 256, 512)
    """
    name, _, rest = spec.partition(":")
    if name not in PRESETS:
        raise ValueError(f"--methods: expected names from {sorted(PRESETS)} (optionally NAME:field=value,...), "
                         f"got {name!r}")
    fields = dict(PRESETS[name])
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in HyperAttentionConfig.__dataclass_fields__:
            raise ValueError(f"--methods: expected field=value with a HyperAttentionConfig field in {spec!r}, "
                             f"got {item!r}")
        if value == "None":
            fields[key] = None
        else:
            fields[key] = _FIELD_TYPES.get(key, int)(value)
    fields.setdefault("seed", seed)
    try:
        return spec, HyperAttentionConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--methods: {spec!r}: {exc}") from None


def _eval_rows(n: int, min_row: int, count: int, seed: int) -> torch.Tensor:
    """Sorted rows of ``count // 64`` random whole blocks of 64 in ``[min_row, n)``."""
    blocks = torch.arange((n - min_row) // 64)
    gen = torch.Generator().manual_seed(seed)
    chosen = blocks[torch.randperm(len(blocks), generator=gen)[:max(1, count // 64)]].sort().values
    return (min_row + chosen.unsqueeze(-1) * 64 + torch.arange(64)).reshape(-1)


def _method_rows(q, k, v, scale, config: HyperAttentionConfig, rows: torch.Tensor, seed: int):
    """The method's causal output at ``rows``, ``(B, Hq, R, D)``, and its stats (of the full call)."""
    from ..ops import AttentionStats, hyper_attention
    from ..reference import peers

    if config.method in peers.RUNNERS:
        out, _, per_row = peers.peer_rows(config.method, q, k, v, scale, True, config, seed, rows)
        # keys/query of the full call: exact rows before min_seq_len plus the sampled rows' average.
        r0 = peers.first_approx_row(q.shape[2], k.shape[2], True, config.effective_min_seq_len)
        full = (r0 * (r0 + 1) / 2 + per_row * (q.shape[2] - r0)) / q.shape[2]
        nan = torch.full(q.shape[:2], float("nan"))
        return out, AttentionStats(config.method, full, nan, torch.zeros(q.shape[:2], dtype=torch.bool))
    out, stats = hyper_attention(q, k, v, causal=True, scale=scale, config=config, return_stats=True)
    return out[:, :, rows].float(), stats


def evaluate(methods: list[str], *, text: str, tokens: int, layers: list[int] | None = None,
             perplexity_layers: list[int] | None = None, rows: int = 1024, min_row: int = 1024, seed: int = 0,
             perplexity: bool = True, progress: bool = True, model=None, tokenizer=None) -> dict:
    """Run the evaluation and return the JSON-ready result (see the module docstring).

    Args:
        methods: method specs (``NAME`` or ``NAME:field=value,...``).
        text: standard-library module whose source is the text.
        tokens: number of tokens.
        layers: layers whose error is measured; None (default) means all.
        perplexity_layers: layers that use the method in the perplexity runs; None means all.
            (``hyperattn eval`` passes :func:`default_layers` for both unless ``--all-layers``.)
        rows: query rows per layer for the error (whole blocks of 64). Default 1024.
        min_row: first query position counted (DESIGN.md §5). Default 1024.
        seed: seed of every method and of the row choice. Default 0.
        perplexity: run the perplexity passes. Default True.
        progress: show a tqdm progress bar over the exact pass, the layers and the
            perplexity passes. Default True.
        model, tokenizer: an already loaded embedded model, on the device to measure on
            (default: load it, on the CPU).

    Returns:
        ``{"device", "versions", "setup", "rows": [per (method, layer)], "perplexity": [...]}``.

    Raises:
        hyperattn.eval.model.EvalExtraMissing: the eval extra or the model is missing.
        ValueError: a bad method spec, layer or token count.

    Examples::

        >>> result = evaluate(["structured"], text="argparse", tokens=2048, layers=[0, 1],
        ...                   perplexity=False, progress=False)  # doctest: +SKIP
        >>> sorted(result["rows"][0])  # doctest: +SKIP
        ['est_error', 'head_errors', 'keys_per_query', 'layer', 'max_error', 'mean_error', 'method', ...]
    """
    from tqdm.auto import tqdm

    from .capture import capture_qkv
    from .metrics import exact_rows, perplexity as ppl_of, relative_error, token_nll
    from .model import load_embedded_model
    from .text import tokenize_text

    parsed = [parse_method(spec, seed) for spec in methods]
    if model is None:
        model, tokenizer = load_embedded_model()
    num_layers = model.config.num_hidden_layers
    layers = list(range(num_layers)) if layers is None else layers
    if min_row + 64 > tokens:
        raise ValueError(f"--tokens: expected at least --min-row + 64 = {min_row + 64} tokens, got {tokens}")
    device = next(model.parameters()).device
    input_ids = tokenize_text(tokenizer, text, tokens).to(device)
    started = time.time()
    bar = tqdm(total=1 + len(layers) * len(parsed) + (len(parsed) if perplexity else 0), desc="exact pass",
               unit="step", disable=not progress)
    capture = capture_qkv(model, input_ids, layers, keep_hidden=True)
    exact_nll = token_nll(model, input_ids, hidden=capture.hidden)
    eval_rows = _eval_rows(tokens, min_row, rows, seed).to(device)
    bar.update(1)

    result_rows = []
    bar.set_description("error per layer")
    for layer in layers:
        q, k, v = capture.layers.pop(layer)
        ref = exact_rows(q, k, v, capture.scale, True, eval_rows)
        for label, cfg in parsed:
            out, stats = _method_rows(q, k, v, capture.scale, cfg, eval_rows, seed)
            err = relative_error(out, ref)[0]
            est = stats.est_error[0].float()
            result_rows.append({
                "method": label, "layer": layer, "mean_error": float(err.mean()), "max_error": float(err.max()),
                "keys_per_query": float(stats.keys_per_query), "head_errors": [round(float(x), 5) for x in err],
                "est_error": [None if x != x else round(float(x), 5) for x in est.tolist()],
                "exact_heads": int(stats.exact_heads.sum()),
            })
            bar.update(1)

    ppl_rows = []
    if perplexity:
        from ..integrations import hf

        bar.set_description("perplexity")
        ppl_rows.append({"method": "exact", "layers": "all", "perplexity": ppl_of(exact_nll),
                         "perplexity_from_min_row": ppl_of(exact_nll, min_row - 1), "ratio": 1.0})
        for label, cfg in parsed:
            hf.enable(model, hf.HyperPolicy(config=cfg, layers=perplexity_layers))
            try:
                nll = token_nll(model, input_ids)
            finally:
                hf.disable(model)
            ppl_rows.append({"method": label, "layers": "all" if perplexity_layers is None else perplexity_layers,
                             "perplexity": ppl_of(nll), "perplexity_from_min_row": ppl_of(nll, min_row - 1),
                             "ratio": ppl_of(nll) / ppl_of(exact_nll),
                             "ratio_from_min_row": ppl_of(nll, min_row - 1) / ppl_of(exact_nll, min_row - 1)})
            bar.update(1)
    bar.close()
    return {
        "device": _device_name(next(model.parameters()).device),
        "versions": _versions(),
        "setup": {"model": _model_label(next(model.parameters()).device), "text": text, "tokens": tokens,
                  "causal": True, "eval_rows": len(eval_rows), "min_row": min_row, "seed": seed,
                  "methods": {label: _config_dict(cfg) for label, cfg in parsed},
                  "seconds": round(time.time() - started, 1)},
        "rows": result_rows,
        "perplexity": ppl_rows,
    }


def _config_dict(cfg: HyperAttentionConfig) -> dict:
    return {name: getattr(cfg, name) for name in HyperAttentionConfig.__dataclass_fields__}


def _device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's processor (machine type where the platform gives none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _model_label(device: torch.device) -> str:
    return f"SmolLM2-135M-Instruct (GGUF Q4_1, fp32 {device.type})"


def _versions() -> dict:
    from importlib import metadata

    from .. import __version__

    versions = {"hyperattn": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def format_table(result: dict) -> str:
    """The per-layer table (mean/max error and keys/query per method) and the perplexity lines."""
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    by_key = {(r["method"], r["layer"]): r for r in result["rows"]}
    layers = sorted({r["layer"] for r in result["rows"]})
    width = max(24, *(len(m) + 2 for m in methods))
    lines = ["error ||O - O_exact|| / ||O_exact|| per head over rows >= "
             f"{result['setup']['min_row']}: mean / max over heads (keys scored per query)",
             "layer " + "".join(f"{m:>{width}}" for m in methods)]
    for layer in layers:
        cells = []
        for m in methods:
            r = by_key[(m, layer)]
            cells.append(f"{r['mean_error']:.3f} / {r['max_error']:.3f} ({r['keys_per_query']:.0f})")
        lines.append(f"{layer:>5} " + "".join(f"{c:>{width}}" for c in cells))
    for m in methods:
        rs = [r for r in result["rows"] if r["method"] == m]
        lines.append(f"{m}: worst layer mean {max(r['mean_error'] for r in rs):.3f}, worst head "
                     f"{max(r['max_error'] for r in rs):.3f}, keys/query {sum(r['keys_per_query'] for r in rs) / len(rs):.0f}"
                     f" on average, {sum(r['exact_heads'] for r in rs)} heads run exact by the guard")
    for p in result["perplexity"]:
        lines.append(f"perplexity {p['method']}: {p['perplexity']:.4f} (x{p['ratio']:.4f} of exact; "
                     f"from position {result['setup']['min_row']}: {p['perplexity_from_min_row']:.4f})")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """PNG of mean (solid) and max (dashed) error by layer, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for i, m in enumerate(methods):
        rs = sorted((r for r in result["rows"] if r["method"] == m), key=lambda r: r["layer"])
        colour = f"C{i % 10}"
        ax.plot([r["layer"] for r in rs], [max(r["mean_error"], 1e-4) for r in rs], color=colour, label=f"{m} mean")
        ax.plot([r["layer"] for r in rs], [max(r["max_error"], 1e-4) for r in rs], color=colour, ls="--", lw=0.8)
    setup = result["setup"]
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative output error (mean; dashed: max over heads)")
    ax.set_title(f"{setup['text']}, {setup['tokens']} tokens, causal, rows >= {setup['min_row']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _device(text: str) -> torch.device:
    """``--device``: ``cpu`` or ``cuda[:N]`` (available here)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"expected cpu here: CUDA is not available, got {text!r}")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli_args import nonnegative_int, positive_int, writable_file
    from .text import DEFAULT_TEXT

    parser.add_argument("--methods", default=None, nargs="+", metavar="SPEC",
                        help=f"method specs NAME[:field=value,...], space separated, NAME in {sorted(PRESETS)} "
                             "(default: structured; with --passkey: exact structured streaming, where 'exact' "
                             "is transformers' SDPA)")
    parser.add_argument("--passkey", action="store_true",
                        help="passkey retrieval instead of error and perplexity: a passkey sentence at each of "
                             "--depths of a --tokens-long prompt, asked for at the end; prints retrieved yes/no "
                             "and the passkey digits' log-probability per method and depth (--error-layers, "
                             "--layers, --all-layers, --rows, --min-row, --no-perplexity and --plot do not apply)")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7",
                        help="with --passkey: passkey positions as fractions of the filler text, comma separated "
                             "(default 0.1,0.3,0.5,0.7)")
    parser.add_argument("--text", default=DEFAULT_TEXT,
                        help=f"standard-library module whose source is the text (default {DEFAULT_TEXT})")
    parser.add_argument("--tokens", type=positive_int, default=None,
                        help=f"number of tokens (default {DEFAULT_TOKENS}; {FULL_TOKENS} with --all-layers; "
                             f"{FULL_TOKENS} with --passkey)")
    parser.add_argument("--all-layers", action="store_true",
                        help=f"the full measurement: every layer (error table and perplexity) on {FULL_TOKENS} "
                             "tokens, not the default handful (every 6th layer and the last: 0,6,12,18,24,29) "
                             f"on {DEFAULT_TOKENS}")
    parser.add_argument("--error-layers", default=None,
                        help="layers whose error is measured: 'all', '0,3,8' or '0-5' (default: the handful, or "
                             "all with --all-layers)")
    parser.add_argument("--layers", default=None,
                        help="layers that use the method in the perplexity runs: 'all', '0,3' or '20-29' "
                             "(default: the handful, or all with --all-layers)")
    parser.add_argument("--rows", type=positive_int, default=1024,
                        help="query rows per layer for the error, whole blocks of 64 (default 1024)")
    parser.add_argument("--min-row", type=nonnegative_int, default=1024,
                        help="first query position counted (default 1024)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="seed of the methods and the row choice (default 0)")
    parser.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs: cpu or cuda[:N] (default cuda when available, else cpu)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the perplexity passes")
    parser.add_argument("--json", metavar="PATH", type=writable_file, help="write the full result as JSON")
    parser.add_argument("--plot", metavar="PNG", type=writable_file, default=DEFAULT_PLOT,
                        help=f"write error by layer per method as a PNG (default {DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")


def _parse_depths(text: str) -> list[float]:
    """``"0.1,0.5"`` -> ``[0.1, 0.5]``; ValueError naming ``--depths`` unless each is in [0, 1]."""
    try:
        depths = [float(d) for d in text.split(",")]
    except ValueError:
        depths = []
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths: expected comma-separated fractions in [0, 1], got {text!r}")
    return depths


def _run_passkey(args: argparse.Namespace, methods: list[str]) -> int:
    from .model import EvalExtraMissing
    from .passkey import evaluate_passkey, format_passkey_table

    try:
        depths = _parse_depths(args.depths)
        _check_methods([m for m in methods if m != "exact"], args)
        result = evaluate_passkey(methods, text=args.text, tokens=args.tokens, depths=depths, seed=args.seed,
                                  device=args.device)
    except (EvalExtraMissing, ValueError, ImportError) as exc:
        print(f"hyperattn eval: {exc}", file=sys.stderr)
        return 2
    print(format_passkey_table(result))
    _write_json(result, args.json)
    return 0


def _check_methods(methods: list[str], args: argparse.Namespace) -> None:
    for spec in methods:
        parse_method(spec, args.seed)


def _load_model(device: torch.device):
    from .model import load_embedded_model

    model, tokenizer = load_embedded_model()
    return model.to(device), tokenizer


def _write_json(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def run(args: argparse.Namespace) -> int:
    from .capture import parse_layers
    from .model import EvalExtraMissing

    if args.tokens is None:
        args.tokens = FULL_TOKENS if args.all_layers or args.passkey else DEFAULT_TOKENS
    if args.passkey:
        return _run_passkey(args, args.methods or ["exact", "structured", "streaming"])
    methods = args.methods or ["structured"]
    methods = methods if isinstance(methods, list) else [methods]
    try:
        _check_methods(methods, args)
        if args.rows < 64:
            raise ValueError(f"--rows: expected an int >= 64 (whole blocks of 64), got {args.rows}")
        if args.min_row + 64 > args.tokens:
            raise ValueError(f"--tokens: expected at least --min-row + 64 = {args.min_row + 64} tokens, "
                             f"got {args.tokens}")
        model, tokenizer = _load_model(args.device)
        num_layers = model.config.num_hidden_layers
        handful = None if args.all_layers else default_layers(num_layers)
        error_layers = handful if args.error_layers is None else parse_layers(args.error_layers, num_layers)
        if args.layers is None:
            ppl_layers = handful
        else:
            ppl_layers = None if args.layers == "all" else parse_layers(args.layers, num_layers)
        result = evaluate(methods, text=args.text, tokens=args.tokens, layers=error_layers,
                          perplexity_layers=ppl_layers, rows=args.rows, min_row=args.min_row, seed=args.seed,
                          perplexity=not args.no_perplexity, model=model, tokenizer=tokenizer)
    except (EvalExtraMissing, ValueError, ImportError) as exc:
        print(f"hyperattn eval: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    _write_json(result, args.json)
    if not args.no_plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0
