"""Backward kernels of ``method="hyper"`` against the PyTorch reference's autograd gradients, on the same draws.

Two ways to run them:

- CUDA (skipped without it): the public ``hyper_attention`` on CUDA tensors (forward and
  backward kernels) against ``torch.autograd`` through the reference, fp32/bf16/fp16.
- CPU, through Triton's interpreter (``TRITON_INTERPRET=1``) in a subprocess (the
  interpreter is chosen when the kernels are decorated, so it cannot be switched on in a
  process that imported them compiled): tiny fp32 shapes, so the kernels' code really runs
  on machines without a GPU. Skipped where triton is not installed.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import HYPER_KERNEL_CASE_IDS, HYPER_KERNEL_CASES, hyper_kernel_config, qkv, rel_err, run_interpreted

from hyperattn import hyper_attention
from hyperattn.reference.hyper import hyper_attention_reference

pytest.importorskip("triton")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# fp32 kernels against the fp32 reference: the same products summed in another order (and
# dk/dv summed by atomics in any order), base-2 exponentials; measured ~3e-7 relative under
# the interpreter. 1e-5 leaves room for the GPU's different summation blocking.
FP32_RTOL = 1e-5
# Low precision (flash-attention's rule, STYLE 7): the kernels' gradient error against the
# fp32 reference's may be at most twice that of exact attention's gradients computed by SDPA
# in the same precision against fp32 SDPA, plus 2e-3 for the LSE merges across launches.
LOWP_FACTOR, LOWP_SLACK = 2.0, 2e-3

CASES, CASE_IDS = HYPER_KERNEL_CASES, HYPER_KERNEL_CASE_IDS
_config = hyper_kernel_config


def _reference_grads(q, k, v, causal, cfg, grad_out, grad_lse):
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, lse = hyper_attention_reference(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal,
                                         block_size=cfg.block_size, sample_size=cfg.sample_size,
                                         num_projs=cfg.lsh_num_projs, min_seq_len=cfg.effective_min_seq_len,
                                         seed=cfg.seed)
    seen = torch.isfinite(lse)
    torch.autograd.backward([out, lse], [grad_out.float(), torch.where(seen, grad_lse, 0.0)])
    return q.grad, k.grad, v.grad


def _sdpa_grads(q, k, v, causal, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    # Bottom-right causal alignment, as the library's, through an explicit mask.
    mask = None
    if causal:
        rows = torch.arange(q.shape[2], device=q.device).unsqueeze(1) + k.shape[2] - q.shape[2]
        mask = torch.arange(k.shape[2], device=q.device) <= rows
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                                           v.repeat_interleave(group, 1), attn_mask=mask)
    out.backward(grad_out.to(q.dtype))
    return [t.grad.float().nan_to_num(0.0) for t in (q, k, v)]


def _assert_low_precision_grads(inputs, ref, q, k, v, causal, grad_out):
    # Each gradient's error against the fp32 reference within LOWP_FACTOR x exact attention's
    # own low-precision error (SDPA in q's dtype against fp32 SDPA) + LOWP_SLACK.
    yard_lowp = _sdpa_grads(q, k, v, causal, grad_out)
    yard_fp32 = _sdpa_grads(q.float(), k.float(), v.float(), causal, grad_out)
    for t, r, lo, hi in zip(inputs, ref, yard_lowp, yard_fp32):
        assert t.grad.dtype == q.dtype and bool(torch.isfinite(t.grad).all())
        assert rel_err(t.grad, r) <= LOWP_FACTOR * rel_err(lo, hi) + LOWP_SLACK


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_kernels_match_reference_gradients(case, causal, dtype, monkeypatch):
    monkeypatch.setenv("HYPERATTN_AUTOTUNE", "0")  # the tuned block shapes run the same code
    bsz, hq, hkv, nq, nk, dim, block, samples, min_len = case
    cfg = _config(block, samples, min_len)
    q, k, v = qkv(bsz, hq, hkv, nq, nk, dim, dtype, device="cuda", seed=11)
    gen = torch.Generator(device="cuda").manual_seed(12)
    grad_out = torch.randn(bsz, hq, nq, dim, device="cuda", generator=gen)
    grad_lse = torch.randn(bsz, hq, nq, device="cuda", generator=gen)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = hyper_attention(*inputs, causal=causal, config=cfg, return_lse=True)
    seen = torch.isfinite(lse)
    torch.autograd.backward([out, lse], [grad_out.to(dtype), torch.where(seen, grad_lse, 0.0)])
    # The reference on the same (rounded) inputs, in fp32: the function the kernels approximate.
    ref = _reference_grads(q, k, v, causal, cfg, grad_out.to(dtype), grad_lse)
    if dtype == torch.float32:
        for t, r in zip(inputs, ref):
            assert bool(torch.isfinite(t.grad).all()) and rel_err(t.grad, r) < FP32_RTOL
        return
    _assert_low_precision_grads(inputs, ref, q, k, v, causal, grad_out)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_of_the_output_alone_matches_reference_gradients(case, causal, dtype, monkeypatch):
    # No gradient on lse: the exact pieces go through SDPA's backward (given the merged
    # output and lse), the approximate ones through the Triton kernels.
    from hyperattn.kernels import hyper as kh

    monkeypatch.setenv("HYPERATTN_AUTOTUNE", "0")
    bsz, hq, hkv, nq, nk, dim, block, samples, min_len = case
    cfg = _config(block, samples, min_len)
    q, k, v = qkv(bsz, hq, hkv, nq, nk, dim, dtype, device="cuda", seed=11)
    grad_out = torch.randn(bsz, hq, nq, dim, device="cuda", generator=torch.Generator(device="cuda").manual_seed(12))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    hyper_attention(*inputs, causal=causal, config=cfg).backward(grad_out.to(dtype))
    assert set(kh._SDPA_REFUSED) != {"cudnn", "flash"}, kh._SDPA_REFUSED
    ref = _reference_grads(q, k, v, causal, cfg, grad_out.to(dtype), torch.zeros(bsz, hq, nq, device="cuda"))
    _assert_low_precision_grads(inputs, ref, q, k, v, causal, grad_out)


@needs_cuda
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_sdpa_backward_of_exact_pieces_equals_the_range_kernels(backend, monkeypatch):
    # The same gradient two ways: SDPA's backward (no lse gradient; the other backend marked
    # refused, so this one runs) and the Triton range kernels (a zero lse gradient takes
    # them). Both fp32-accumulated from bf16 inputs; SDPA rounds each run's gradient to bf16
    # before it is added (2**-9 relative), so they agree to well under 1%.
    from hyperattn.kernels import hyper as kh

    if backend in kh._SDPA_REFUSED:  # not called on this torch (see _SDPA_REFUSED)
        pytest.skip(kh._SDPA_REFUSED[backend])
    other = {"cudnn": "flash", "flash": "cudnn"}[backend]
    monkeypatch.setattr(kh, "_SDPA_REFUSED", {other: "refused by the test"})
    # Runs split into calls of at most three pieces (the bound on a call's copies).
    monkeypatch.setattr(kh, "_RUN_ELEMENTS", 3 * 8 * 1024 * 128)
    # Causal: the plan's diagonal leaves and off-diagonal blocks are exact, two runs of
    # equal pieces (batched calls; two batch rows: copies, not views). Not causal, one
    # approximate piece covers everything at this length.
    for causal, bsz, n in ((True, 1, 8192), (True, 2, 4096), (False, 1, 1024)):
        q, k, v = qkv(bsz, 8, 2, n, n, 128, torch.bfloat16, device="cuda", seed=3)
        sel = kh.hyper_select(q, k, causal=causal, block_size=256, sample_size=256, num_projs=7, min_seq_len=1024,
                              seed=0)
        assert sel.plan.exact_pieces
        out, lse = kh.hyper_attend(q, k, v, 128 ** -0.5, sel)
        grad_out = torch.randn_like(out)
        sdpa = kh.hyper_backward(q, k, v, out, lse, grad_out, None, 128 ** -0.5, sel)
        assert backend not in kh._SDPA_REFUSED, kh._SDPA_REFUSED
        ranges = kh.hyper_backward(q, k, v, out, lse, grad_out, torch.zeros_like(lse), 128 ** -0.5, sel)
        for a, b in zip(sdpa, ranges):
            assert rel_err(a.float(), b.float()) < 1e-2


@pytest.mark.parametrize("n, min_len", [(131072, 4096), (8192, 1024), (100000, 4096), (3000, 1000), (1500, 1024)])
def test_exact_pieces_batch_into_runs_of_equal_evenly_spaced_pieces(n, min_len):
    # The SDPA backward's batching (host code, no kernel): every exact piece of the causal
    # plan in exactly one run; a run's pieces equal in shape and causality, at one step no
    # shorter than a piece (its views never overlap); and a run's view is the pieces' slices.
    from hyperattn.kernels import hyper as kh
    from hyperattn.reference.hyper import causal_plan

    pieces = tuple(p for p in causal_plan(n, n, min_len) if not p.approx)
    assert pieces
    runs = kh._piece_runs(pieces)
    assert sorted(p.q0 * n + p.k0 for run in runs for p in run) == sorted(p.q0 * n + p.k0 for p in pieces)
    for run in runs:
        first = run[0]
        lq, lk = first.q1 - first.q0, first.k1 - first.k0
        assert all((p.q1 - p.q0, p.k1 - p.k0, p.causal) == (lq, lk, first.causal) for p in run)
        for a, b in zip(run, run[1:]):
            assert b.q0 - a.q0 == b.k0 - a.k0 == run[1].q0 - first.q0 >= max(lq, lk)
    if n & (n - 1) == 0:  # a power of two: the diagonal leaves, and the off-diagonal blocks, one run each
        assert len(runs) == 2
    x = torch.arange(2 * 3 * n * 2, dtype=torch.float32).view(2, 3, n, 2)
    for run in runs:
        p = run[0]
        step = run[1].q0 - p.q0 if len(run) > 1 else 0
        view = kh._run_view(x, p.k0, len(run), step, p.k1 - p.k0)
        for i, piece in enumerate(run):
            assert torch.equal(view[:, i], x[:, :, piece.k0:piece.k1])


@needs_cuda
def test_backward_saves_no_quadratic_tensor():
    # Saved for backward: q, k, v, out (B*H*N*D each), lse and the O(N) selection. At 16k keys
    # an N x N score matrix per head would be 1 GB; the whole saved state stays under 8x the inputs.
    cfg = _config(256, 256, 1024)
    q, k, v = qkv(1, 4, 4, 16384, 16384, 64, torch.bfloat16, device="cuda")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = hyper_attention(*inputs, causal=True, config=cfg)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    assert kept < 8 * sum(t.numel() * t.element_size() for t in (q, k, v))
    out.float().square().sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in inputs)


# --- CPU, Triton interpreter -----------------------------------------------------------------------

# Runs in a child process with TRITON_INTERPRET=1 (conftest.run_interpreted).
_INTERPRETED = textwrap.dedent("""
    import json, sys
    import torch
    from hyperattn.kernels import attention
    from hyperattn.kernels import hyper as kh
    from hyperattn.reference.hyper import hyper_attention_reference

    results = []
    cases, chunk_tiles = json.loads(sys.argv[1])
    # Before any plan is built: how many tiles of a piece one program of the samples' dk, dv walks.
    attention.SAMPLE_CHUNK_TILES = chunk_tiles
    for causal, (b, hq, hkv, nq, nk, block, samples, min_len) in cases:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, n, 16, generator=gen) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
        kw = dict(causal=causal, block_size=block, sample_size=samples, num_projs=3, min_seq_len=min_len, seed=0)
        sel = kh.hyper_select(q, k, **kw)
        out, lse = kh.hyper_attend(q, k, v, 0.25, sel)
        grad_out, grad_lse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
        grad_lse = torch.where(torch.isfinite(lse), grad_lse, 0.0)
        grads = kh.hyper_backward(q, k, v, out, lse, grad_out, grad_lse, 0.25, sel)
        delta = attention.backward_delta(grad_out, out, None)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = hyper_attention_reference(*leaves, scale=0.25, **kw)
        torch.autograd.backward([ref_out, ref_lse], [grad_out, grad_lse])
        results.append({
            "out": float((out - ref_out).norm() / ref_out.norm()),
            "grads": [float((g - t.grad).norm() / t.grad.norm()) for g, t in zip(grads, leaves)],
            "finite": all(bool(torch.isfinite(g).all()) for g in grads),
            "delta": float((delta - (grad_out * out).sum(-1)).abs().max()),
            "groups": len(sel.plan.groups), "exact_launches": len(sel.plan.exact),
            "most_chunks": max(int(g.chunks.shape[0]) for g in sel.plan.groups),
            "most_tiles": max(int(g.tiles.shape[0]) for g in sel.plan.groups),
            "most_block_tiles": max(int((g.blocks[:, 1] - g.blocks[:, 0]).max()) for g in sel.plan.groups),
        })
    print(json.dumps(results))
""")

# (causal, (B, Hq, Hkv, Nq, Nk, block_size, sample_size, min_seq_len)): GQA, padding
# (lengths no multiple of a block), Nq > Nk (rows with no key), Nq < Nk, two batches.
INTERPRETED_CASES = [
    (True, (1, 4, 2, 100, 100, 16, 8, 16)),
    (False, (1, 4, 2, 70, 90, 16, 8, 16)),
    (True, (1, 2, 1, 90, 50, 16, 8, 16)),
    (True, (2, 2, 2, 50, 90, 16, 8, 16)),
    (False, (1, 2, 1, 1100, 256, 128, 32, 64)),  # sorted query blocks of 550 rows: 5 tiles on one key block
]


@pytest.mark.parametrize("kind", ["causal-plan", "noncausal-plan", "monotone", "scattered"])
def test_range_key_tiles_list_exactly_the_row_tiles_that_reach_each_key_tile(kind):
    # Against the definition: row tile i reaches key tile t when a row of i has a key of t in
    # [lo, hi]. Plans' ranges are monotone (binary searches); scattered ones take the table.
    from hyperattn.kernels.attention import range_key_tiles
    from hyperattn.kernels.hyper import _exact_ranges
    from hyperattn.reference.hyper import causal_plan, noncausal_plan

    gen = torch.Generator().manual_seed(0)
    nq, nk = 1000, 1300
    if kind == "causal-plan":
        (lo, hi), = _exact_ranges(causal_plan(nq, nk, 128), nq, nk)[:1]
    elif kind == "noncausal-plan":
        (lo, hi), = _exact_ranges(noncausal_plan(nq, nk, 2048), nq, nk)
    elif kind == "monotone":
        lo = torch.sort(torch.randint(0, nk, (nq,), generator=gen)).values
        hi = torch.minimum(lo + torch.randint(-5, 300, (nq,), generator=gen), torch.tensor(nk - 1))
        hi = torch.cummax(hi, 0).values
    else:
        lo = torch.randint(0, nk, (nq,), generator=gen)
        hi = lo + torch.randint(-50, 200, (nq,), generator=gen)
    lo, hi = lo.int(), hi.clamp(max=nk - 1).int()
    offsets, row_tiles = range_key_tiles(lo, hi, nk)
    keys = torch.arange(nk)
    sees = (keys[None, :] >= lo[:, None].long()) & (keys[None, :] <= hi[:, None].long())  # (Nq, Nk)
    rows_pad = -(-nq // 64) * 64 - nq
    reach = torch.nn.functional.pad(sees, (0, -(-nk // 64) * 64 - nk, 0, rows_pad))
    reach = reach.reshape(-(-nq // 64), 64, -1, 64).any(3).any(1)  # (row tiles, key tiles)
    # A row tile's hull: [its smallest lo, its largest hi + 1) over rows that see a key.
    some = torch.nn.functional.pad(lo <= hi, (0, rows_pad)).reshape(-1, 64)
    lo_t = torch.where(some, torch.nn.functional.pad(lo.long(), (0, rows_pad)).reshape(-1, 64), nk).amin(1)
    hi_t = torch.where(some, torch.nn.functional.pad(hi.long(), (0, rows_pad)).reshape(-1, 64) + 1, 0).amax(1)
    assert offsets.numel() == reach.shape[1] + 1
    for t in range(reach.shape[1]):
        listed = row_tiles[offsets[t]:offsets[t + 1]].tolist()
        # Exactly the tiles whose hull meets the key tile, ascending; so never one that a row
        # reaches is missed (a hull may span a gap between rows' ranges: the kernel masks it).
        hull = (lo_t < 64 * t + 64) & (hi_t > 64 * t)
        assert listed == torch.nonzero(hull).squeeze(1).tolist()
        assert set(torch.nonzero(reach[:, t]).squeeze(1).tolist()) <= set(listed)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA: the compiled kernels are tested above")
@pytest.mark.parametrize("chunk_tiles", [32, 1], ids=["default-chunks", "one-tile-chunks"])
def test_backward_kernels_under_the_interpreter_match_reference(chunk_tiles):
    # One tile per chunk: the samples' dk, dv of a piece come from several programs (atomic adds).
    results = run_interpreted(_INTERPRETED, json.dumps([INTERPRETED_CASES, chunk_tiles]))
    assert len(results) == len(INTERPRETED_CASES)
    # The key-block-outer dk, dv walk several tiles of rows on one key block.
    assert any(r["most_block_tiles"] > 1 for r in results)
    if chunk_tiles == 1:
        assert any(r["most_chunks"] > 1 for r in results)
    else:
        assert all(r["most_chunks"] < r["most_tiles"] for r in results if r["most_tiles"] > 1)
    # Both backward kernels ran: gathered (approximate pieces) and range (exact pieces).
    assert all(r["groups"] >= 1 for r in results) and any(r["exact_launches"] >= 1 for r in results)
    for result in results:
        assert result["finite"]
        # The backward's row sums without an lse gradient (the one with it is in the grads):
        # fp32 sums of 16 products of unit-scale values, so 1e-5 absolute bounds their rounding.
        assert result["delta"] < 1e-5
        assert result["out"] < FP32_RTOL
        assert max(result["grads"]) < FP32_RTOL


_DRIVER = textwrap.dedent("""
    import json, sys
    import torch
    import hyperattn as ha
    from hyperattn.methods import hyper as H

    results = []
    for causal in json.loads(sys.argv[1]):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, 100, 16, generator=gen) for h in (4, 2, 2))
        cfg = ha.HyperAttentionConfig(method="hyper", block_size=16, sample_size=8, lsh_num_projs=3, min_seq_len=16,
                                      seed=0)
        w_out, w_lse = torch.randn(100, 16, generator=gen), torch.randn(100, generator=gen)
        grads = []
        for kernels in (True, False):
            H.kernel_supported = (lambda q, c: None) if kernels else (lambda q, c: "reference")
            x = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse = ha.hyper_attention(*x, causal=causal, config=cfg, return_lse=True)
            ((out * w_out).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * w_lse).sum()).backward()
            grads.append([t.grad for t in x])
        results.append([float((m - r).norm() / r.norm()) for m, r in zip(*grads)])
    print(json.dumps(results))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA: the compiled kernels are tested above")
def test_driver_function_under_the_interpreter_matches_the_reference():
    # The driver's autograd.Function (kernels forward, backward kernels on the forward's
    # selection) through the public call, against the reference's autograd on the same draws.
    results = run_interpreted(_DRIVER, json.dumps([True, False]))
    assert len(results) == 2
    for errors in results:
        assert max(errors) < FP32_RTOL, errors
