"""Candidate changes to the forward's two attention launches, timed beside the shipped kernels on one call.

    PYTHONPATH=src python benchmarks/kernel_ab.py --lengths 131072 32768 --json out.json
    TRITON_INTERPRET=1 HYPERATTN_AUTOTUNE=0 PYTHONPATH=src python benchmarks/kernel_ab.py --check

The fixed call (``max_error=None``, B1 Hq32/Hkv8 D128 bf16 random input, the bench's
``structured-fixed`` row) runs with ``kernels.sparse._forward`` replaced by a copy that
records CUDA events between its two launches and swaps in a candidate:

- ``sparse=tma``: the exact blocks' unmasked tiles loaded through tensor descriptors
  (Hopper's bulk tensor copies, one per K and V tile) instead of per-thread pointer loads;
  the masked tiles as shipped. ``tma_g``: the gathered columns' tiles too (their copies are
  contiguous per chunk). ``tma_ws``: ``tma`` with a warp-specialised loop. ``half``: each
  selected block's 128 rows over two programs of 64 (pointer loads as shipped): half the
  accumulator per program, more programs per SM, keys read twice (from L2).
- ``lsh=more``: the LSH pass autotuned over twice the tile shapes (smaller tiles, fewer
  warps: the pass is short per program and may be bound by latency, not bandwidth).

Each row: the call (events, median of 7), each launch's time, the largest difference to
the shipped kernels' output and the configs the autotuner kept; a variant that fails to
compile is a row with its error. ``host_to_attention_ms``: the host's time from the call's
start to the first attention launch, with the GPU idle at the start (median of 7): at
32k the launches come last and the call ends about one LSH pass and one sparse pass after
this point, so it says how much of the call is host time.

``--check`` (CPU, Triton's interpreter): the candidates' outputs against the shipped
kernels' on a small input through the driver; prints the relative differences.

A scratch bench: the candidates live here until one is measured faster and moved into
``kernels/sparse.py``, and this file goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch
import triton
import triton.language as tl

import hyperattn as ha
from hyperattn.kernels import sparse as S
from hyperattn.kernels.sparse import (_autotuned, _block_program, _exact_blocks_pass, _exact_tile, _gathered_cols,
                                      _gathered_tiles, _lsh_kernel, _merge_into, _outside_lsh, _start, _tile_update,
                                      _whole_tiles)


@triton.jit
def _sparse_tma(Q, K, V, KG, VG, OUT, LSE, EB, ACTIVE, WLO, WHI, GIDX, GLOGW, GSLOT, LO, HI,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                num_heads, group, kv_heads, nq, nk, offset, first, c_blocks, num_e, chunk_blocks, num_chunks,
                s_pad, win_width, qk_scale, g_rows,
                CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr, NE_P: tl.constexpr, GTMA: tl.constexpr, WS: tl.constexpr):
    # kernels.sparse._sparse_kernel with descriptor loads in the unmasked loop (and, GTMA, the gathered tiles).
    jj, bh, b, h, kvh, j, rows, row_ok = _block_program(num_heads, group, first, nq, T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = qk_scale * 1.4426950408889634
    q, acc, m_i, l_i, k_base, v_base = _start(Q, b, h, kvh, rows, row_ok, stride_qb, stride_qh, stride_qn, stride_kb,
                                              stride_kh, stride_vb, stride_vh, T, HEAD_DIM)
    sel = bh * c_blocks + jj
    if tl.load(ACTIVE + sel) != 0:
        kd = tl.make_tensor_descriptor(K + k_base, shape=[nk, HEAD_DIM], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
        vd = tl.make_tensor_descriptor(V + v_base, shape=[nk, HEAD_DIM], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
        TPB: tl.constexpr = T // BLOCK_N
        n_tiles = num_e * TPB
        n_whole = _whole_tiles(EB, sel, num_e, win_width, j, nk, offset, n_tiles, CAUSAL, T, BLOCK_N, NE_P)
        for t in tl.range(0, n_whole, warp_specialize=WS):
            kb = tl.load(EB + sel * num_e + (t // TPB + win_width) % num_e)
            c0 = tl.maximum(kb, 0) * T + (t % TPB) * BLOCK_N
            k = kd.load([c0, 0])
            v = vd.load([c0, 0])
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, tl.where(kb >= 0, 0.0, float("-inf")), None,
                                         qk_scale, False, PRECISION)
        for t in range(n_whole, n_tiles):
            k, v, _, valid = _exact_tile(K, V, EB, sel, num_e, win_width, t, rows, nk, offset, k_base, v_base,
                                         stride_kn, stride_vn, offs_n, offs_d, CAUSAL, T, BLOCK_N)
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, 0.0, valid, qk_scale, True, PRECISION)
        g_base = ((b * kv_heads + kvh) * num_chunks + j // chunk_blocks) * s_pad
        if GTMA:
            kgd = tl.make_tensor_descriptor(KG, shape=[g_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
            vgd = tl.make_tensor_descriptor(VG, shape=[g_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
            wlo = tl.load(WLO + j).to(tl.int32)
            whi = tl.load(WHI + j).to(tl.int32)
            lo = tl.load(LO + bh * nq + rows, mask=row_ok, other=0)
            hi = tl.load(HI + bh * nq + rows, mask=row_ok, other=0)
            for s0 in range(0, s_pad, BLOCK_N):
                _, ok, slot, bias = _gathered_cols(GIDX, GLOGW, GSLOT, EB, sel, num_e, g_base + s0 + offs_n, wlo, whi,
                                                   CAUSAL, T)
                k = kgd.load([(g_base + s0).to(tl.int32), 0])
                v = vgd.load([(g_base + s0).to(tl.int32), 0])
                acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, bias[None, :],
                                             _outside_lsh(ok, slot, lo, hi, row_ok), qk_scale, True, PRECISION)
        else:
            acc, m_i, l_i = _gathered_tiles(acc, m_i, l_i, q, KG, VG, GIDX, GLOGW, GSLOT, EB, WLO, WHI, LO, HI, sel,
                                            num_e, j, bh, rows, row_ok, nq, g_base, s_pad, offs_n, offs_d, qk_scale,
                                            CAUSAL, HEAD_DIM, T, BLOCK_N, PRECISION)
    _merge_into(OUT, LSE, acc, m_i, l_i, bh, nq, rows, row_ok, offs_d, HEAD_DIM)


_TMA = _autotuned(_sparse_tma, [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                                for n, w, s in ((64, 8, 3), (128, 8, 2), (64, 4, 3), (32, 4, 2), (64, 8, 2),
                                                (128, 8, 3))],
                  ["HEAD_DIM", "CAUSAL", "T", "PRECISION", "NE_P", "s_pad", "GTMA", "WS"], restore_value=["OUT", "LSE"])
@triton.jit
def _sparse_half(Q, K, V, KG, VG, OUT, LSE, EB, ACTIVE, WLO, WHI, GIDX, GLOGW, GSLOT, LO, HI,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 num_heads, group, kv_heads, nq, nk, offset, first, c_blocks, num_e, chunk_blocks, num_chunks,
                 s_pad, win_width, qk_scale,
                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr, NE_P: tl.constexpr, BLOCK_M: tl.constexpr):
    # kernels.sparse._sparse_kernel with each selected block's rows split over T // BLOCK_M
    # programs (smaller accumulators: more programs per SM). Program (jj * T // BLOCK_M + part).
    PARTS: tl.constexpr = T // BLOCK_M
    jj = tl.program_id(0) // PARTS
    part = tl.program_id(0) % PARTS
    bh = tl.program_id(1).to(tl.int64)
    h = bh % num_heads
    b = bh // num_heads
    kvh = h // group
    j = first + jj
    rows = j * T + part * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < nq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = qk_scale * 1.4426950408889634
    q, acc, m_i, l_i, k_base, v_base = _start(Q, b, h, kvh, rows, row_ok, stride_qb, stride_qh, stride_qn, stride_kb,
                                              stride_kh, stride_vb, stride_vh, BLOCK_M, HEAD_DIM)
    sel = bh * c_blocks + jj
    if tl.load(ACTIVE + sel) != 0:
        # _whole_tiles judges from the block's first row: conservative for the later parts.
        acc, m_i, l_i = _exact_blocks_pass(acc, m_i, l_i, q, K, V, EB, sel, num_e, win_width, j, rows, nk, offset,
                                           k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, qk_scale, CAUSAL, T,
                                           BLOCK_N, PRECISION, NE_P)
        g_base = ((b * kv_heads + kvh) * num_chunks + j // chunk_blocks) * s_pad
        acc, m_i, l_i = _gathered_tiles(acc, m_i, l_i, q, KG, VG, GIDX, GLOGW, GSLOT, EB, WLO, WHI, LO, HI, sel,
                                        num_e, j, bh, rows, row_ok, nq, g_base, s_pad, offs_n, offs_d, qk_scale,
                                        CAUSAL, HEAD_DIM, T, BLOCK_N, PRECISION)
    _merge_into(OUT, LSE, acc, m_i, l_i, bh, nq, rows, row_ok, offs_d, HEAD_DIM)


_HALF = _autotuned(_sparse_half, [triton.Config({"BLOCK_N": n, "BLOCK_M": 64}, num_warps=w, num_stages=s)
                                  for n, w, s in ((64, 4, 3), (128, 4, 2), (64, 4, 2), (32, 4, 3), (128, 8, 2))],
                   ["HEAD_DIM", "CAUSAL", "T", "PRECISION", "NE_P", "s_pad"], restore_value=["OUT", "LSE"])
_LSH_MORE = _autotuned(_lsh_kernel, [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                                     for m, n, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (32, 32, 4, 2),
                                                        (64, 64, 4, 1), (32, 64, 4, 1), (64, 32, 4, 2),
                                                        (128, 32, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3),
                                                        (64, 32, 2, 2), (32, 32, 2, 2), (128, 64, 4, 2))],
                       ["HEAD_DIM", "T", "PRECISION"])

MODE = {"sparse": "base", "lsh": "base"}
LAST: dict = {}


class _NoEvent:
    def record(self):
        pass


def _forward(q, k, v, scale, plan, tab):
    # kernels.sparse._forward, with events between the launches and the candidates swapped in.
    LAST["host_at_attention"] = time.perf_counter()
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    t = plan.block
    out = torch.empty(bsz, hq, nq, dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(bsz, hq, nq, device=q.device, dtype=torch.float32)
    strides = S._strides(q, k, v)
    precision = S._precision(q.dtype)
    ev = [torch.cuda.Event(enable_timing=True) if q.is_cuda else _NoEvent() for _ in range(3)]
    lsh = S._LSH if MODE["lsh"] == "base" else _LSH_MORE
    ev[0].record()
    lsh[lambda m: (triton.cdiv(nq * (hq // hkv), m["BLOCK_M"]), bsz * hkv)](
        q, k, v, out, lse, tab.q_order, tab.k_order, tab.lo, tab.hi, tab.eb, *strides, hq // hkv, hkv, nq, nk,
        plan.first * t, plan.first, tab.c_blocks, tab.num_e, tab.lsh_e0, scale, HEAD_DIM=dim, T=t,
        PRECISION=precision)
    ev[1].record()
    args = (q, k, v, tab.k_g, tab.v_g, out, lse, tab.eb, tab.active, tab.win_lo, tab.win_hi, tab.g_idx, tab.g_logw,
            tab.g_slot, tab.lo, tab.hi, *strides, hq, hq // hkv, hkv, nq, nk, plan.offset, plan.first, tab.c_blocks,
            tab.num_e, plan.chunk_blocks, tab.num_chunks, tab.s_pad, tab.win_width, scale)
    meta = dict(CAUSAL=plan.causal, HEAD_DIM=dim, T=t, PRECISION=precision, NE_P=tab.ne_p)
    if tab.c_blocks and MODE["sparse"] == "base":
        S._SPARSE[(tab.c_blocks, bsz * hq)](*args, **meta)
    elif tab.c_blocks and MODE["sparse"] == "half":
        LAST["candidate_launches"] = LAST.get("candidate_launches", 0) + 1
        _HALF[lambda m: (tab.c_blocks * (t // m["BLOCK_M"]), bsz * hq)](*args, **meta)
    elif tab.c_blocks:
        LAST["candidate_launches"] = LAST.get("candidate_launches", 0) + 1
        _TMA[(tab.c_blocks, bsz * hq)](*args, tab.k_g.numel() // dim, **meta, GTMA=MODE["sparse"].startswith("tma_g"),
                                       WS=MODE["sparse"].endswith("_ws"))
    ev[2].record()
    LAST["events"] = ev
    return out, lse


S._forward = _forward

MODES = [("base", "base"), ("tma", "base"), ("tma_g", "base"), ("half", "base"), ("base", "more"), ("base", "base"),
         ("tma_ws", "base")]


def _row(n: int, causal: bool, sparse: str, lsh: str, call, ref, reps: int = 7) -> dict:
    MODE.update(sparse=sparse, lsh=lsh)
    row = {"n": n, "causal": causal, "sparse": sparse, "lsh": lsh}
    try:
        for _ in range(3):  # compiles and tunes
            out = call()
        torch.cuda.synchronize()
        row["max_diff"] = float((out.float() - ref).abs().max()) if ref is not None else 0.0
        calls, lsh_ms, sparse_ms, host = [], [], [], []
        for _ in range(reps):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            call()
            end.record()
            host.append((LAST["host_at_attention"] - t0) * 1e3)
            end.synchronize()
            ev = LAST["events"]
            calls.append(start.elapsed_time(end))
            lsh_ms.append(ev[0].elapsed_time(ev[1]))
            sparse_ms.append(ev[1].elapsed_time(ev[2]))
        kernels = {"sparse": {"base": S._SPARSE, "half": _HALF}.get(sparse, _TMA),
                   "lsh": S._LSH if lsh == "base" else _LSH_MORE}
        row.update(call_ms=statistics.median(calls), lsh_ms=statistics.median(lsh_ms),
                   sparse_ms=statistics.median(sparse_ms), host_to_attention_ms=statistics.median(host),
                   configs={name: [str(c) for c in kern.cache.values()] for name, kern in kernels.items()})
        return row, out.float()
    except Exception:  # a candidate that does not compile is a result too
        row["error"] = traceback.format_exc()[-1500:]
        return row, None


def time_lengths(lengths: list[int], path: str | None) -> list[dict]:
    rows = []
    for n in lengths:
        for causal in ((True, False) if n >= 131072 else (True,)):
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            cfg = ha.HyperAttentionConfig(seed=0, max_error=None, min_seq_len=4096)
            ref = None
            for sparse, lsh in MODES:
                row, out = _row(n, causal, sparse, lsh, lambda: ha.hyper_attention(q, k, v, causal=causal,
                                                                                   config=cfg), ref)
                ref = out if ref is None else ref
                print(json.dumps(row), flush=True)
                rows.append(row)
                if path:
                    from hyperattn.bench.forward import versions

                    with open(path, "w") as f:
                        json.dump({**versions(), "script": "benchmarks/kernel_ab.py", "rows": rows}, f, indent=1)
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def check() -> None:
    # The interpreted driver (kernels on CPU tensors), as tests/test_structured_interpreted.py runs it.
    sys.path.insert(0, "tests")
    from conftest import INTERPRETER_SHIM, qkv, rel_err

    exec(INTERPRETER_SHIM, {})  # its own namespace: the shim patches the interpreter module
    from hyperattn.methods import structured as M

    M._kernels_ok = lambda x: True
    for causal, nq, nk in ((True, 2048, 2048), (False, 1800, 2100)):
        q, k, v = qkv(1, 4, 2, nq, nk, 32, seed=5)
        k[:, :, 0] *= 4
        cfg = ha.HyperAttentionConfig(seed=0, max_error=None, min_seq_len=256, chunk=512)
        outs = {}
        for sparse in ("base", "tma", "tma_g", "half"):
            MODE.update(sparse=sparse, lsh="base")
            with torch.no_grad():
                outs[sparse] = M.run(q, k, v, 32 ** -0.5, causal, cfg, 0, need_stats=False)[0].float()
        print(json.dumps({"causal": causal, "nq": nq, "nk": nk,
                          "rel_diff": {s: rel_err(o, outs["base"]) for s, o in outs.items()},
                          "candidate_launches": LAST.get("candidate_launches", 0)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 32768])
    parser.add_argument("--json")
    parser.add_argument("--check", action="store_true", help="CPU: the candidates against the shipped kernels")
    args = parser.parse_args()
    if args.check:
        check()
        return
    # Descriptors made on the device need scratch memory from the launch's allocator.
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    time_lengths(args.lengths, args.json)


if __name__ == "__main__":
    main()
