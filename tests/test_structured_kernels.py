"""The structured method's CUDA attention step (Triton and FlexAttention engines) against its PyTorch reference.

Both run on one selection built by the reference's own selection code, so the kernel is
checked on exactly the blocks, gathered columns and LSH ranges the reference attends.
Everything here needs CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import exact_low_precision, qkv, rel_err

import hyperattn as ha
from hyperattn.kernels import structured as ker
from hyperattn.methods.exact import exact
from hyperattn.reference import selection as S
from hyperattn.reference import structured as ref
from hyperattn.reference.exact import attention_lse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# fp32 kernel vs fp32 reference on one selection: the same terms summed in another order
# with base-2 exponentials and an LSE merge of three passes; a few 1e-7 relative, 2e-5
# leaves room.
FP32_RTOL = 2e-5
# Low precision: the kernel rounds operands and softmax weights to the input dtype as flash
# kernels do; its error against the fp32 reference may be at most twice that of exact
# attention rounded the same way (flash-attention's rule), plus the same for the merge.
LOWP_FACTOR = 2.0

# (B, Hq, Hkv, Nq, Nk, D)
CASES = [
    (1, 4, 2, 1500, 1500, 64),
    (2, 2, 1, 700, 900, 128),
    (1, 4, 4, 900, 700, 64),
    (1, 8, 2, 2100, 2100, 128),
]
IDS = ["gqa", "nq<nk-d128", "nq>nk", "gqa4-d128"]


def _selection(q, k, v, causal, key_blocks=2, samples=96, lsh_block=32, seed=0):
    """A selection of every approximate block built as the driver builds it (1x tier, no guard)."""
    scale = q.shape[-1] ** -0.5
    bsz, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
    plan = S.make_plan(q.shape[2], k.shape[2], causal, 128, 128, 512, 256)
    heads = torch.arange(hq, device=q.device)
    probe = S.probe_rows(plan, seed, bsz, heads, 2, 4)
    _, _, heavy, _ = S.probe_exact(q, k, v, scale, plan, probe, 16, 4, 2)
    pooled = S.pool(q, k, plan, 16)
    lsh = S.lsh_ranges(q, k, plan, lsh_block, 7, seed)
    blocks = torch.arange(plan.first, plan.nqb, device=q.device).expand(bsz, hq, -1)
    scores = S.block_scores(pooled, scale, plan, blocks)
    ranked = S.rank_blocks(scores, key_blocks)
    c_scores = S.chunk_scores(scores, plan.first, plan, hkv)
    g_idx, g_logw = S.gather_columns(plan, c_scores, heavy, torch.full((bsz, hkv, plan.num_chunks), samples,
                                     device=q.device), samples, 4, 0.3, seed, torch.arange(hkv, device=q.device))
    exact = S.exact_blocks(plan, blocks, ranked, torch.full_like(blocks, key_blocks))
    return plan, S.Selection(blocks, exact, torch.ones_like(blocks, dtype=torch.bool), g_idx, g_logw), lsh


def _engines():
    from hyperattn.kernels.sparse import attend_triton

    return {"triton": attend_triton, "flex": ker.attend_flex}


# Every case on the engine that runs (Triton); FlexAttention's, the stock yardstick, on the
# first (it compiles per shape, 20-60 s each on a GPU machine: with every case the file
# did not fit one device call).
RUNS = [("triton", case) for case in IDS] + [("flex", IDS[0])]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("engine,case_id", RUNS, ids=[f"{e}-{c}" for e, c in RUNS])
def test_attend_matches_reference_fp32(engine, case_id, causal):
    b, hq, hkv, nq, nk, d = CASES[IDS.index(case_id)]
    q, k, v = qkv(b, hq, hkv, nq, nk, d, device="cuda")
    plan, sel, lsh = _selection(q, k, v, causal)
    out_r, lse_r = ref.attend(q, k, v, d ** -0.5, plan, sel, lsh)
    out_k, lse_k = _engines()[engine](q, k, v, d ** -0.5, plan, sel, lsh)
    assert out_k.shape == out_r.shape and lse_k.shape == lse_r.shape
    assert rel_err(out_k.float(), out_r) < FP32_RTOL
    finite = torch.isfinite(lse_r)
    assert torch.equal(finite, torch.isfinite(lse_k))
    assert float((lse_k - lse_r)[finite].abs().max()) < 1e-4


@pytest.mark.parametrize("engine,dtype", [("triton", torch.bfloat16), ("triton", torch.float16),
                                          ("flex", torch.bfloat16)], ids=["triton-bf16", "triton-fp16", "flex-bf16"])
def test_attend_low_precision(dtype, engine):
    q, k, v = qkv(1, 4, 2, 1500, 1500, 64, device="cuda")
    plan, sel, lsh = _selection(q, k, v, True)
    out_r, _ = ref.attend(q, k, v, 64 ** -0.5, plan, sel, lsh)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    out_k, _ = _engines()[engine](ql, kl, vl, 64 ** -0.5, plan, sel, lsh)
    exact = attention_lse(q, k, v, 64 ** -0.5, True)[0]
    yardstick = rel_err(exact_low_precision(ql, kl, vl, True), exact)
    assert rel_err(out_k.float(), out_r) <= LOWP_FACTOR * yardstick + 1e-3


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_public_call_matches_cpu_reference(causal):
    q, k, v = qkv(1, 4, 2, 2000, 2000, 64)
    cfg = ha.HyperAttentionConfig(seed=3, min_seq_len=512, chunk=512, max_error=None)
    cpu, st_cpu = ha.hyper_attention(q, k, v, causal=causal, config=cfg, return_stats=True)
    gpu, st_gpu = ha.hyper_attention(q.cuda(), k.cuda(), v.cuda(), causal=causal, config=cfg, return_stats=True)
    # Same seed, same selection (fp32 block scores agree far inside their gaps here), so the
    # two paths differ by rounding only.
    assert rel_err(gpu.cpu(), cpu) < 1e-4
    assert torch.allclose(st_gpu.est_error.cpu(), st_cpu.est_error, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_full_budget_is_exact_on_cuda(causal):
    q, k, v = qkv(1, 4, 2, 1800, 1800, 64, device="cuda")
    cfg = ha.HyperAttentionConfig(seed=0, min_seq_len=256, sample_size=1800, max_error=None)
    out, lse = ha.hyper_attention(q, k, v, causal=causal, config=cfg, return_lse=True)
    ref_out, ref_lse = attention_lse(q, k, v, 64 ** -0.5, causal)
    assert rel_err(out, ref_out) < FP32_RTOL
    assert float((lse - ref_lse).abs().max()) < 1e-4


def test_guard_on_random_input_runs_exact_through_sdpa():
    q, k, v = qkv(1, 8, 2, 8192, 8192, 64, dtype=torch.bfloat16, device="cuda")
    cfg = ha.HyperAttentionConfig(seed=0, min_seq_len=1024)
    out, stats = ha.hyper_attention(q, k, v, causal=True, config=cfg, return_stats=True)
    assert bool(stats.exact_heads.all())
    assert torch.equal(out, exact(q, k, v, 64 ** -0.5, True, False)[0])


def test_default_is_sdpa_below_the_crossover():
    q, k, v = qkv(1, 4, 2, 4096, 4096, 64, dtype=torch.bfloat16, device="cuda")
    out = ha.hyper_attention(q, k, v, causal=True)
    assert torch.equal(out, exact(q, k, v, 64 ** -0.5, True, False)[0])
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(out, expect) < 1e-2  # another backend's bf16 rounding


def test_default_through_the_registered_op_is_sdpa_below_the_crossover():
    # transformers' integration calls the registered op: without return_lse it must take the
    # same single SDPA call as hyper_attention (the same bits).
    from hyperattn.custom_op import attention

    q, k, v = qkv(1, 4, 2, 4096, 4096, 64, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(attention(q, k, v, True), exact(q, k, v, 64 ** -0.5, True, False)[0])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("split_keys", [16384, 300], ids=["one-split", "key-splits"])
@pytest.mark.parametrize("span", [None, 400], ids=["all-keys", "span"])
def test_probe_exact_matches_reference(causal, split_keys, span, monkeypatch):
    from hyperattn.kernels import selection as ker_sel

    monkeypatch.setattr(ker_sel, "_PROBE_SPLIT_KEYS", split_keys)  # 300: 4 splits merged by LSE
    q, k, v = qkv(1, 4, 2, 1500, 1300, 64, device="cuda")
    plan = S.make_plan(1500, 1300, causal, 128, 128, 512, 256)
    probe = S.probe_rows(plan, 0, 1, torch.arange(4, device="cuda"), 2, 8)
    # span 400: the finding rows of later chunks scan a part of the keys (heavy_range).
    out_r, lse_r, heavy_r, pairs_r = S.probe_exact(q, k, v, 0.125, plan, probe, 16, 4, 2, span=span)
    out_k, lse_k, heavy_k, pairs_k = ker_sel.probe_exact(q, k, v, 0.125, plan, probe, 16, 4, 2, span=span)
    assert rel_err(out_k, out_r) < FP32_RTOL and float(pairs_k) == float(pairs_r)
    finite = torch.isfinite(lse_r)
    assert float((lse_k - lse_r)[finite].abs().max()) < 1e-4
    # Same heavy columns as sets (ties in the mass may order them differently).
    assert torch.equal(heavy_k.sort(-1).values, heavy_r.sort(-1).values)
    # The heavy columns alone (no guard, no stats): the finding rows' LSE, no values.
    none, lse_f, heavy_f, _ = ker_sel.probe_exact(q, k, v, 0.125, plan, probe, 16, 4, 2, need_out=False, span=span)
    find = S.finders(probe.shape[-1], 2, "cpu").cuda()
    assert none is None and torch.equal(heavy_f.sort(-1).values, heavy_r.sort(-1).values)
    assert float((lse_f - lse_r)[finite & find].abs().max()) < 1e-4
    assert bool(torch.isneginf(lse_f[..., ~find]).all())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_block_scores_match_reference(causal):
    from hyperattn.kernels import selection as ker_sel

    q, k, _ = qkv(1, 4, 2, 1500, 1300, 64, device="cuda")
    plan = S.make_plan(1500, 1300, causal, 128, 128, 512, 256)
    pooled = S.pool(q, k, plan, 16)
    blocks = torch.arange(plan.first, plan.nqb, device="cuda").expand(1, 4, -1)
    ref_scores = S.block_scores(pooled, 0.125, plan, blocks)
    ker_scores = ker_sel.block_scores(pooled, 0.125, plan, blocks)
    assert torch.equal(ref_scores < -0.5, ker_scores < -0.5)  # the same candidates
    # fp32 products (ieee) summed in another order; scores are softmax weights summed over
    # 8 pooled rows (at most 8), so 1e-5 is ~100 ulps of the largest.
    assert float((ref_scores - ker_scores).abs().max()) < 1e-5


@pytest.mark.parametrize("nkb, count", [(10, 4), (1024, 32), (5000, 4)])
def test_rank_blocks_matches_reference(nkb, count):
    from hyperattn.kernels import selection as ker_sel

    scores = torch.rand(2, 3, 7, nkb, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    scores[..., ::3] = -1.0  # non-candidates
    assert torch.equal(ker_sel.rank_blocks(scores, count), S.rank_blocks(scores, count))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_attend_rows_matches_reference(causal):
    q, k, v = qkv(1, 4, 2, 1500, 1500, 64, device="cuda")
    plan, sel, lsh = _selection(q, k, v, causal)
    rows = torch.stack([sel.blocks * 128 + 5, sel.blocks * 128 + 77, torch.full_like(sel.blocks, -1)], dim=-1)
    rows = torch.where(rows < 1500, rows, -1)
    out_r, lse_r = ref.attend_rows(q, k, v, 0.125, plan, sel, lsh, rows)
    out_k, lse_k = ker.attend_rows(q, k, v, 0.125, plan, sel, lsh, rows)
    assert rel_err(out_k, out_r) < FP32_RTOL
    finite = torch.isfinite(lse_r)
    assert torch.equal(finite, torch.isfinite(lse_k))
    assert float((lse_k - lse_r)[finite].abs().max()) < 1e-4


def test_pool_matches_reference_and_ignores_other_heads():
    from hyperattn.kernels import selection as ker_sel

    q, k, _ = qkv(1, 8, 4, 1500, 1300, 64, dtype=torch.bfloat16, device="cuda")
    plan = S.make_plan(1500, 1300, True, 128, 128, 512, 256)
    mine = ker_sel.pool(q, k, plan, 16)
    ref_pool = S.pool(q.float(), k.float(), plan, 16)
    # fp32 sums rounded once to bf16 (relative 2**-8) against fp32 means.
    assert rel_err(mine.q.float(), ref_pool.q) < 4e-3 and rel_err(mine.k.float(), ref_pool.k) < 4e-3
    # A head's means are the same bits whichever other heads are in the call (what makes a
    # 2-GPU context-parallel call select exactly as a 1-GPU one).
    half = ker_sel.pool(q[:, 4:], k[:, 2:], plan, 16)
    assert torch.equal(half.q, mine.q[:, 4:]) and torch.equal(half.k, mine.k[:, 2:])


def _grads(attend, q, k, v, scale, plan, sel, lsh, dtype=None):
    """Gradients of a fixed random functional of ``out`` and ``lse`` (rows that attend nothing: lse term 0)."""
    gen = torch.Generator(device=q.device).manual_seed(3)
    rows = plan.nq - plan.first * plan.block
    w_out = torch.randn(rows, q.shape[-1], device=q.device, generator=gen)
    w_lse = torch.randn(rows, device=q.device, generator=gen)
    x = [(t if dtype is None else t.to(dtype)).clone().requires_grad_() for t in (q, k, v)]
    out, lse = attend(*x, scale, plan, sel, lsh)
    ((out.float() * w_out).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * w_lse).sum()).backward()
    return [t.grad.float() for t in x]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("engine,case_id", RUNS, ids=[f"{e}-{c}" for e, c in RUNS])
def test_attend_gradients_match_reference_fp32(engine, case_id, causal):
    # Training on CUDA: for one fixed selection, each engine's gradients (Triton's backward
    # kernels; FlexAttention's block-sparse backward and LSE merges under autograd) equal
    # the reference's autograd gradients, for a loss on both the output and the LSE.
    b, hq, hkv, nq, nk, d = CASES[IDS.index(case_id)]
    q, k, v = qkv(b, hq, hkv, nq, nk, d, device="cuda")
    plan, sel, lsh = _selection(q, k, v, causal)
    want = _grads(ref.attend, q, k, v, d ** -0.5, plan, sel, lsh)
    mine = _grads(_engines()[engine], q, k, v, d ** -0.5, plan, sel, lsh)
    for g_mine, g_want in zip(mine, want):
        assert torch.isfinite(g_mine).all()
        assert rel_err(g_mine, g_want) < 1e-4  # fp32: the same terms in another order, atomics in any order


@pytest.mark.parametrize("causal,max_error", [(True, None), (False, None), (True, 0.05)],
                         ids=["causal", "noncausal", "causal-guard"])
def test_public_call_gradients_match_the_reference_driver(causal, max_error, monkeypatch):
    # Under autograd on CUDA one Function owns every row (the attention step on the kernels
    # and the exact rows before min_seq_len, recomputed through SDPA/the reference in its
    # backward); the guard's exact chunks are written over its output. Its gradients equal
    # the reference driver's on the same draws, fp32, a loss on out and lse (1e-4 as above).
    from hyperattn.methods import structured as M

    q, k, v = qkv(1, 4, 2, 2100, 2100, 64, device="cuda", seed=5)
    k[:, :, 0] *= 4
    k[:, :, 500] = q[:, 0, -1].mean(0) * 3
    cfg = ha.HyperAttentionConfig(seed=0, max_error=max_error, min_seq_len=256, chunk=512)
    gen = torch.Generator(device="cuda").manual_seed(3)
    w_out, w_lse = torch.randn(2100, 64, device="cuda", generator=gen), torch.randn(2100, device="cuda", generator=gen)
    grads = []
    for kernels in (True, False):
        if not kernels:
            monkeypatch.setattr(M, "_kernels_ok", lambda x: False)
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = ha.hyper_attention(*x, causal=causal, config=cfg, return_lse=True)
        ((out * w_out).sum() + (lse * w_lse).sum()).backward()
        grads.append([t.grad for t in x])
    errors = [rel_err(g_mine, g_want) for g_mine, g_want in zip(*grads)]
    assert all(bool(torch.isfinite(g).all()) for g in grads[0])
    assert max(errors) < 1e-4, errors


def test_attend_gradients_with_inactive_blocks():
    # Chunks the guard sends to exact leave their blocks inactive (no exact blocks, no
    # columns, no LSH range): such rows get no gradient from this step, and the rest is
    # unchanged.
    q, k, v = qkv(1, 4, 2, 2100, 2100, 64, device="cuda")
    plan, sel, lsh = _selection(q, k, v, True)
    active = torch.rand(sel.active.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) > 0.4
    row_block = torch.arange(plan.nq, device="cuda") // plan.block
    row_active = torch.nn.functional.pad(active, (plan.first, 0)).gather(2, row_block.expand(1, 4, -1))
    sel = S.Selection(sel.blocks, torch.where(active.unsqueeze(-1), sel.exact_blocks, -1), active, sel.gather_idx,
                      sel.gather_logw)
    lsh = S.Lsh(lsh.order, lsh.slot, torch.where(row_active, lsh.lo, 0), torch.where(row_active, lsh.hi, 0),
                lsh.q_order)
    want = _grads(ref.attend, q, k, v, 0.125, plan, sel, lsh)
    mine = _grads(ker.attend, q, k, v, 0.125, plan, sel, lsh)
    for g_mine, g_want in zip(mine, want):
        assert rel_err(g_mine, g_want) < 1e-4
    assert float(mine[0][0][~row_active[0]].abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attend_gradients_low_precision(dtype):
    # The kernels round operands and P/dS to the input dtype as flash backward kernels do:
    # their gradients' error against the fp32 reference may be at most twice that of
    # exact attention's gradients computed by SDPA in that dtype (flash-attention's rule).
    q, k, v = qkv(1, 4, 2, 2100, 2100, 64, device="cuda")
    plan, sel, lsh = _selection(q, k, v, True)
    want = _grads(ref.attend, q, k, v, 0.125, plan, sel, lsh)
    mine = _grads(ker.attend, q, k, v, 0.125, plan, sel, lsh, dtype=dtype)

    def sdpa(x, y, z):
        return torch.nn.functional.scaled_dot_product_attention(x, y, z, is_causal=True, scale=0.125,
                                                                enable_gqa=True)

    gen = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn_like(q, generator=gen)
    exact = []
    for cast in (torch.float32, dtype):
        x = [t.to(cast).clone().requires_grad_() for t in (q, k, v)]
        (sdpa(*x).float() * w).sum().backward()
        exact.append([t.grad.float() for t in x])
    for g_mine, g_want, e_low, e_hi in zip(mine, want, exact[1], exact[0]):
        assert torch.isfinite(g_mine).all()
        assert rel_err(g_mine, g_want) <= 2.0 * rel_err(e_low, e_hi) + 2e-3


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_probe_rows_equal_the_reference(causal):
    from hyperattn.kernels import selection as ker_sel

    plan = S.make_plan(3000, 2600 if not causal else 3000, causal, 128, 128, 512, 256)
    heads = torch.arange(3, 9, device="cuda")
    for seed in (0, 12345678901234, 2 ** 62 - 5):
        # The same counter hash in int64 and the same fp64 arithmetic: the same rows, bit for bit.
        assert torch.equal(ker_sel.probe_rows(plan, seed, 2, heads, 4, 3), S.probe_rows(plan, seed, 2, heads, 4, 3))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_same_seed_same_output_whatever_the_heads(causal):
    # The residual samples are drawn from summed block scores: those sums must not depend on
    # the run (no atomics) or on the heads in the call (context parallelism calls a slice).
    from hyperattn.ops import _attention

    q, k, v = qkv(1, 8, 2, 5000, 5000, 64, dtype=torch.bfloat16, device="cuda")
    cfg = ha.HyperAttentionConfig(seed=5, min_seq_len=1024, chunk=1024, max_error=None)
    first = ha.hyper_attention(q, k, v, causal=causal, config=cfg)
    assert torch.equal(first, ha.hyper_attention(q, k, v, causal=causal, config=cfg))
    half = _attention(q[:, 4:], k[:, 1:], v[:, 1:], causal, None, cfg, return_lse=False, head_offset=4, total_heads=8)
    assert torch.equal(half, first[:, 4:])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("lsh_tiles", [S.LSH_TILES, 1], ids=["default-cut", "cut-to-one-tile"])
def test_lsh_ranges_equal_the_reference(causal, lsh_tiles, monkeypatch):
    # The hashing kernel's products (tf32x3, fp32-accurate) and the reference's (fp32
    # matmul) round differently: a bucket may differ where a projection is within ~1e-6
    # relative of 0 (expected: none or a handful of the 18k vectors here). From the same
    # buckets the kernels' ranges (binary searches, the cut) equal the reference's.
    from hyperattn.kernels import lsh as ker_lsh
    from hyperattn.kernels import selection as ker_sel
    from hyperattn.reference.lsh import draw_projections, lsh_buckets

    monkeypatch.setattr(S, "LSH_TILES", lsh_tiles)  # 1: the cut of each sorted block's ranges changes many rows
    q, k, v = qkv(2, 4, 2, 1500, 1500, 64, device="cuda")
    proj = draw_projections(64, 7, torch.Generator().manual_seed(3)).cuda()
    for x in (q, k):
        assert float((ker_lsh.lsh_buckets(x, proj) != lsh_buckets(x, proj)).float().mean()) < 1e-3
    plan = S.make_plan(1500, 1500, causal, 128, 128, 512, 256, "cuda")
    ker_ranges = ker_sel.lsh_ranges(q, k, plan, 32, 7, 3)
    same = S.bucket_ranges(ker_lsh.lsh_buckets(q, proj), ker_lsh.lsh_buckets(k, proj), plan, 32)
    for name in ("order", "slot", "lo", "hi", "q_order"):
        assert torch.equal(getattr(ker_ranges, name), getattr(same, name)), name


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("samples", [96, 2000, 0], ids=["sampled", "every-candidate", "sinks-and-heavy-only"])
def test_gather_columns_equal_the_reference(causal, samples):
    # The kernel repeats the reference's float64 operations in order on the reference's own
    # CDF: the same columns; log-weights within float32 rounding of a float64 log.
    from hyperattn.kernels import selection as ker_sel

    q, k, v = qkv(2, 4, 2, 1500, 1300, 64, device="cuda")
    plan = S.make_plan(1500, 1300, causal, 128, 128, 512, 256, "cuda")
    probe = S.probe_rows(plan, 0, 2, torch.arange(4, device="cuda"), 4, 4)
    heavy = S.probe_exact(q, k, v, 0.125, plan, probe, 16, 4, 4)[2]
    blocks = torch.arange(plan.first, plan.nqb, device="cuda").expand(2, 4, -1)
    c_scores = S.chunk_scores(S.block_scores(S.pool(q, k, plan, 16), 0.125, plan, blocks), plan.first, plan, 2)
    m = torch.full((2, 2, plan.num_chunks), samples, device="cuda")
    m[0, 1, 1] = min(7, samples)  # chunks draw different counts under the guard
    kv_heads = torch.arange(2, device="cuda") + 3
    idx_r, logw_r = S.gather_columns(plan, c_scores, heavy, m, samples, 4, 0.3, 11, kv_heads)
    idx_k, logw_k = ker_sel.gather_columns(plan, c_scores, heavy, m, samples, 4, 0.3, 11, kv_heads)
    assert torch.equal(idx_k, idx_r)
    assert torch.equal(torch.isfinite(logw_k), torch.isfinite(logw_r))
    finite = torch.isfinite(logw_r)
    assert torch.allclose(logw_k[finite], logw_r[finite], rtol=1e-6, atol=1e-6)
