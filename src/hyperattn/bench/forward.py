"""Forward (or forward+backward) timings of HyperAttention and its baselines on one device, and a kernel-time profile.

Every implementation is timed on the same inputs in the same process: one warm-up call
(compilation, autotuning), one call that records peak memory, then CUDA-event timings of
repeated calls (at least ``min_reps``, more while under ``budget_ms``), median reported.
On a CPU, wall-clock timings replace events and only the CPU implementations run.

With ``backward=True`` a timed call is the forward and ``torch.autograd.grad`` of the
output with respect to q, k and v for a fixed random output gradient (what one training
step of the layer costs); rows carry ``"backward": true``.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import HyperAttentionConfig
from ..ops import hyper_attention
from ..reference.hyper import causal_plan, hyper_attention_reference, noncausal_plan, scored_pairs

__all__ = ["IMPLS", "BenchShape", "run_forward_bench", "profile_hyper", "exact_pairs", "versions", "commit"]

#: Implementations the harness knows (on a CPU only the PyTorch ones run). ``"hyper"`` is the
#: paper's method (``method="hyper"``) through the public call, ``"structured"`` the package
#: default (``HyperAttentionConfig()``) through the public call, ``"structured-fixed"`` the
#: same without the guard (``max_error=None``: every head at the base budget). On random
#: inputs attention is diffuse, so the guard finds every head above ``max_error`` and runs it
#: exactly after its trials; ``structured-fixed`` is the cost of the approximate path the
#: guard takes on real heads.
IMPLS = ("hyper", "hyper-paper-plan", "hyper-reference", "structured", "structured-fixed", "sdpa-cudnn", "sdpa-flash",
         "sdpa-efficient", "sdpa-math", "flex-sink-window")

#: ``"hyper-paper-plan"``: the paper's method with the recursion of the authors' code
#: (insuhan/hyper-attn) at its default ``min_seq_len=4096``. There the causal base case is
#: ``Nk <= min_seq_len`` but an off-diagonal block is exact only when it has *fewer* than
#: ``min_seq_len`` queries, so the 4096 x 4096 off-diagonal block of an 8192 segment is
#: approximate and the exact diagonal blocks have 4096 keys. DESIGN.md's rule ("exact when
#: n <= min_seq_len" for both) makes that block exact; with ``min_seq_len=2048`` it yields
#: exactly the authors' pieces.
PAPER_PLAN_CONFIG = HyperAttentionConfig(method="hyper", min_seq_len=2048)

# Sink tokens and window of the FlexAttention baseline (the block-sparse reference point).
FLEX_SINKS, FLEX_WINDOW = 128, 512


@dataclass(frozen=True)
class BenchShape:
    """Inputs of one benchmark: ``q (batch, heads, n, head_dim)``, ``k, v (batch, kv_heads, n, head_dim)``."""

    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"


class _Skip(Exception):
    """A row that is not run, with the reason."""


def commit() -> str | None:
    """This checkout's short commit (``HYPERATTN_COMMIT`` where the tree was copied without its ``.git``)."""
    if os.environ.get("HYPERATTN_COMMIT"):
        return os.environ["HYPERATTN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions(device: torch.device | None = None) -> dict:
    """Device name, library versions and the commit, recorded in every results file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "hyperattn_commit": commit()}


def exact_pairs(n: int, causal: bool) -> int:
    """(query, key) scores of exact attention for one head at ``Nq = Nk = n``."""
    return n * (n + 1) // 2 if causal else n * n


def _flex_pairs(n: int) -> int:
    rows = torch.arange(n, dtype=torch.float64)
    window = torch.clamp(rows + 1, max=FLEX_WINDOW)
    sinks = torch.clamp(rows + 1 - FLEX_WINDOW, min=0, max=FLEX_SINKS)
    return int((window + sinks).sum())


def _inputs(n: int, shape: BenchShape, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    q = torch.randn(shape.batch, shape.heads, n, shape.head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(shape.batch, shape.kv_heads, n, shape.head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(shape.batch, shape.kv_heads, n, shape.head_dim, device=device, dtype=dtype, generator=gen)
    return q, k, v


def _sdpa(backend_name: str, q: Tensor, k: Tensor, v: Tensor, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend_name]
    gqa = q.shape[1] != k.shape[1]

    def call(kk, vv, enable_gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=enable_gqa)

    config = {"backend": backend_name, "gqa": "native" if gqa else "none"}
    try:
        call(k, v, gqa)
        return (lambda: call(k, v, gqa)), config
    except RuntimeError:
        if not gqa:
            raise
    # The backend has no GQA: K/V repeated per query head before timing, as a user would.
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    call(kr, vr, False)
    return (lambda: call(kr, vr, False)), {**config, "gqa": "kv repeated outside the timing"}


def _flex(q: Tensor, k: Tensor, v: Tensor, causal: bool):
    if not causal:
        raise _Skip("skipped: the sink+window baseline is causal only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sink_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < FLEX_SINKS) | (q_idx - kv_idx < FLEX_WINDOW))

    n = q.shape[2]
    mask = create_block_mask(sink_window, None, None, n, n, device=q.device, _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    return (lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa)), {"sinks": FLEX_SINKS, "window": FLEX_WINDOW,
                                                                      "compiled": True}


def _hyper_config_dict(config: HyperAttentionConfig, device: torch.device | None = None) -> dict:
    """The config as run: ``min_seq_len`` resolved (on CUDA the structured method's crossover)."""
    min_len = config.effective_min_seq_len
    if config.min_seq_len is None and config.method == "structured" and device is not None:
        from ..methods.structured import default_min_seq_len

        min_len = default_min_seq_len(device)
    return {**asdict(config), "min_seq_len": min_len}


def _build(impl: str, q: Tensor, k: Tensor, v: Tensor, causal: bool, min_seq_len: int | None = None
           ) -> tuple[Callable, dict, int]:
    n = q.shape[2]
    if impl in ("hyper", "hyper-paper-plan", "hyper-reference"):
        config = PAPER_PLAN_CONFIG if impl == "hyper-paper-plan" else HyperAttentionConfig(method="hyper")
        plan = (causal_plan if causal else noncausal_plan)(n, n, config.effective_min_seq_len)
        pairs = scored_pairs(plan, config.block_size, config.sample_size, n, n)
        if impl != "hyper-reference":
            return (lambda: hyper_attention(q, k, v, causal=causal, config=config)), _hyper_config_dict(config), pairs
        scale = q.shape[-1] ** -0.5

        def reference():
            return hyper_attention_reference(q, k, v, scale=scale, causal=causal, block_size=config.block_size,
                                             sample_size=config.sample_size, num_projs=config.lsh_num_projs,
                                             min_seq_len=config.effective_min_seq_len, seed=0)

        return reference, {**_hyper_config_dict(config), "seed": 0, "path": "PyTorch reference"}, pairs
    if impl in ("structured", "structured-fixed"):
        # The fixed row measures the approximation itself, so it passes min_seq_len explicitly
        # (below the crossover the default would be SDPA); the structured row is the default.
        # A given min_seq_len replaces both (e.g. to measure the guard below the crossover).
        if impl == "structured-fixed":
            config = HyperAttentionConfig(seed=0, max_error=None, min_seq_len=min_seq_len or 4096)
        else:
            config = HyperAttentionConfig(seed=0, min_seq_len=min_seq_len)
        _, stats = hyper_attention(q, k, v, causal=causal, config=config, return_stats=True)
        pairs = round(stats.keys_per_query * n)
        return (lambda: hyper_attention(q, k, v, causal=causal, config=config)), _hyper_config_dict(config, q.device), \
            pairs
    if impl.startswith("sdpa-"):
        fn, config = _sdpa(impl.removeprefix("sdpa-"), q, k, v, causal)
        return fn, config, exact_pairs(n, causal)
    if impl == "flex-sink-window":
        fn, config = _flex(q, k, v, causal)
        return fn, config, _flex_pairs(n)
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def time_once_ms(fn: Callable, cuda: bool) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on the current stream, else the host clock."""
    if not cuda:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _time_ms(fn: Callable, cuda: bool, budget_ms: float, min_reps: int, max_reps: int) -> float:
    times = [time_once_ms(fn, cuda)]
    reps = int(min(max_reps, max(min_reps, budget_ms / max(times[0], 1e-3))))
    times += [time_once_ms(fn, cuda) for _ in range(reps - 1)]
    return statistics.median(times)


# Matmul work of forward+backward over the forward's: the backward recomputes the scores and
# computes dP, dQ, dK, dV (flash-attention's 2.5x), so 3.5x the forward's 4 * D * pairs.
BACKWARD_WORK = 3.5


def _with_backward(fn: Callable, q: Tensor, k: Tensor, v: Tensor) -> Callable:
    """``fn`` (a forward on q, k, v that require grad) followed by the gradients of its output."""
    gen = torch.Generator(device=q.device).manual_seed(1)
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype, generator=gen)

    def step():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, (q, k, v), grad)

    return step


def _run_row(impl: str, n: int, causal: bool, shape: BenchShape, device: torch.device, max_n: dict,
             only: dict, budget_ms: float, min_reps: int, max_reps: int, backward: bool = False,
             min_seq_len: int | None = None) -> dict:
    row = {"n": n, "causal": causal, "backward": backward, "impl": impl, "config": {}, "ms": None, "peak_gb": None}
    cuda = device.type == "cuda"
    try:
        if n > max_n.get(impl, math.inf):
            raise _Skip(f"skipped: n > {max_n[impl]} for {impl} (set by --max-n)")
        if impl in only and n not in only[impl]:
            raise _Skip(f"skipped: {impl} runs only at n in {sorted(only[impl])}")
        q, k, v = _inputs(n, shape, device)
        if backward:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        fn, config, pairs = _build(impl, q, k, v, causal, min_seq_len)
        if backward:
            fn = _with_backward(fn, q, k, v)
        row["config"] = config
        row["pairs_per_head"] = pairs
        fn()  # warm-up: compilation, autotuning, plan caches
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row["ms"] = _time_ms(fn, cuda, budget_ms, min_reps, max_reps)
        work = BACKWARD_WORK if backward else 1.0
        row["tflops"] = work * 4 * shape.head_dim * pairs * shape.batch * shape.heads / (row["ms"] * 1e-3) / 1e12
    except _Skip as skip:
        row["error"] = str(skip)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as exc:  # a failing backend is a result (e.g. unsupported shape), not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def run_forward_bench(lengths: list[int], impls: list[str], causal_modes: list[bool], shape: BenchShape,
                      device: torch.device, max_n: dict | None = None, only: dict | None = None,
                      budget_ms: float = 400.0, min_reps: int = 3, max_reps: int = 20, progress: bool = True,
                      on_row: Callable[[dict], None] | None = None, backward: bool = False,
                      min_seq_len: int | None = None) -> dict:
    """Time every ``(n, causal, impl)``; returns the results object (schema in :mod:`hyperattn.bench`).

    ``backward``: time forward+backward (rows with ``"backward": true``) instead of the forward.
    ``min_seq_len``: that of both structured rows (default: ``structured`` the method's own,
    ``structured-fixed`` 4096); the rows' ``config`` records it.

    ``max_n``: ``{impl: N}`` skips an implementation above ``N``; ``only``: ``{impl: lengths}``
    runs it only at those lengths (rows skipped with a reason). ``on_row`` receives the
    results so far after every row (to save partial results).

    Examples::

        >>> import torch
        >>> from hyperattn.bench.forward import BenchShape, run_forward_bench
        >>> shape = BenchShape(heads=2, kv_heads=1, head_dim=32, dtype="float32")
        >>> res = run_forward_bench([256], ["hyper", "sdpa-math"], [True], shape, torch.device("cpu"),
        ...                         progress=False)
        >>> sorted(r["impl"] for r in res["rows"])
        ['hyper', 'sdpa-math']
    """
    from tqdm import tqdm

    jobs = [(n, causal, impl) for n in lengths for causal in causal_modes for impl in impls]
    results = {**versions(), "shape": asdict(shape), "rows": []}
    for n, causal, impl in tqdm(jobs, desc="bench", disable=not progress):
        results["rows"].append(_run_row(impl, n, causal, shape, device, max_n or {}, only or {}, budget_ms,
                                        min_reps, max_reps, backward, min_seq_len))
        if on_row is not None:
            on_row(results)
    return results


# Kernel-name fragments of each stage of the CUDA path, for the profile.
_STAGES = (
    ("hashing", ("_lsh_keys_kernel",)),
    ("sorting", ("sort", "Sort", "radix", "Radix", "scatter", "Scatter")),
    ("exact pieces", ("_range_attention_kernel",)),
    ("approximate pieces", ("_gathered_attention_kernel",)),
    # Backward: exact pieces through the Triton range kernels or SDPA's backward (cuDNN's
    # kernels are named "..._flash_bprop_...", flash's "flash_bwd_...").
    ("exact pieces backward", ("_range_attention_bwd_kernel", "_range_attention_dkv_kernel", "flash_bwd",
                               "flash_bprop")),
    ("approximate pieces backward", ("_gathered_attention_bwd_kernel", "_block_dkv_kernel", "_sample_dkv_kernel")),
)


def profile_hyper(n: int, causal: bool, shape: BenchShape, device: torch.device, reps: int = 3,
                  backward: bool = False) -> dict:
    """GPU time per stage of one ``method="hyper"`` call (torch.profiler, mean over ``reps``), in ms.

    Stages: hashing, sorting (sorts and the inverse permutation), exact pieces,
    approximate pieces, with ``backward`` their backward launches too, and other (input
    checks, sample tables, casts, gradient sums); plus ``total`` and the ten most expensive
    kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _inputs(n, shape, device)
    config = HyperAttentionConfig(method="hyper")
    if backward:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        grad = torch.randn_like(q)

    def call():
        out = hyper_attention(q, k, v, causal=causal, config=config)
        if backward:
            out.backward(grad)

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.device_time / 1e3 / reps
    stages = {name: 0.0 for name, _ in _STAGES} | {"other": 0.0}
    for name, ms in per_kernel.items():
        stage = next((s for s, keys in _STAGES if any(key in name for key in keys)), "other")
        stages[stage] += ms
    top = sorted(per_kernel.items(), key=lambda item: -item[1])[:10]
    if not backward:
        stages = {name: ms for name, ms in stages.items() if not name.endswith("backward")}
    return {"n": n, "causal": causal, "backward": backward, "stages_ms": stages, "total_ms": sum(stages.values()),
            "top_kernels_ms": [{"name": name[:120], "ms": ms} for name, ms in top]}
