"""Where one call of the structured method's fixed budget spends its time on CUDA: GPU or host.

    PYTHONPATH=src python benchmarks/structured_profile.py --lengths 32768 131072 --json out.json --tables DIR

For each length, on B1 Hq32/Hkv8 D128 bf16 causal random input, through the public call
with ``max_error=None`` (the bench's ``structured-fixed`` row):

- ``event_ms``: CUDA events around one call (median of 7 after warm-up);
- ``host_enqueue_ms``: the host's time in the call, the GPU idle at its start (median of 7).
  Near ``event_ms`` the call is host-bound; well below it, GPU-bound;
- ``gpu_kernel_total_ms``: the self CUDA time of one call under ``torch.profiler``, whose
  per-kernel table goes to ``DIR/structured-fixed-kernels-N.txt``;
- a CUDA-graph trial: the call without the finite check (``check_finite=False``; the check
  waits for its verdict on the host) captured once and replayed (``graph_replay_ms``, and
  the largest difference to an eager call), or why capture failed (``graph_error``).

cuDNN SDPA on the same input is timed beside it (``cudnn_ms``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import hyperattn as ha
from hyperattn.bench.forward import time_once_ms, versions


def _median_ms(fn, reps: int = 7) -> float:
    return statistics.median(time_once_ms(fn, True) for _ in range(reps))


def _host_ms(fn, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def _graph_trial(fn) -> dict:
    # Warm-up on a side stream, as torch.cuda.graph asks, then one capture and its replays.
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn()
        eager = fn()
        graph.replay()
        torch.cuda.synchronize()
        return {"graph_replay_ms": _median_ms(graph.replay),
                "graph_max_diff": float((captured.float() - eager.float()).abs().max())}
    except RuntimeError as exc:  # capture refuses host syncs and unpinned host copies
        return {"graph_error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def profile_call(n: int, tables: Path | None) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = ha.HyperAttentionConfig(seed=0, max_error=None, min_seq_len=4096)

    def call():
        return ha.hyper_attention(q, k, v, causal=True, config=cfg)

    for _ in range(3):  # compiles and tunes
        call()
    row = {"n": n, "causal": True, "impl": "structured-fixed", "event_ms": _median_ms(call),
           "host_enqueue_ms": _host_ms(call)}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["cudnn_ms"] = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                     reps=3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    row["gpu_kernel_total_ms"] = sum(e.self_device_time_total for e in averages
                                     if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    if tables is not None:
        (tables / f"structured-fixed-kernels-{n}.txt").write_text(
            averages.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70))
    # The finite check reads its verdict on the host (a wait no graph can hold): the trial
    # captures the call without it.
    unchecked = dataclasses.replace(cfg, check_finite=False)
    row.update(_graph_trial(lambda: ha.hyper_attention(q, k, v, causal=True, config=unchecked)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--json")
    parser.add_argument("--tables", type=Path, help="folder for the per-kernel tables")
    args = parser.parse_args()
    if args.tables is not None:
        args.tables.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.lengths:
        rows.append(profile_call(n, args.tables))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**versions(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
