"""Triton kernels of ``method="hyper"`` against the PyTorch reference, on the same draws.

The launch-plan tests run wherever ``triton`` imports; the kernel tests need CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HYPER_KERNEL_CASE_IDS, HYPER_KERNEL_CASES, exact_low_precision, hyper_kernel_config, qkv, rel_err

from hyperattn import HyperAttentionConfig, hyper_attention
from hyperattn.reference.exact import attention_lse
from hyperattn.reference.hyper import causal_plan, draw_randomness, hyper_attention_reference, noncausal_plan
from hyperattn.reference.lsh import lsh_buckets

triton = pytest.importorskip("triton")

from hyperattn.kernels.hyper import kernel_plan  # after importorskip: needs triton

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def _first_config_only():
    # The kernels' code is the same for every tuned block shape; tuning here would only add
    # minutes of compilation (the benchmark exercises the tuned path).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYPERATTN_AUTOTUNE", "0")
        yield

# fp32 kernel vs fp32 reference: the same terms summed in another order, base-2 exponentials
# and LSE merges in place; measured ~3e-7 relative, 1e-5 leaves room for ~20 merges per row.
FP32_RTOL = 1e-5
# Low precision (flash-attention's rule, STYLE 7): the kernel's error against the fp32
# reference may be at most twice that of exact attention computed in the same precision.
LOWP_FACTOR = 2.0

CASES, CASE_IDS = HYPER_KERNEL_CASES, HYPER_KERNEL_CASE_IDS
_config = hyper_kernel_config


def _reference(q, k, v, causal, cfg):
    return hyper_attention_reference(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal, block_size=cfg.block_size,
                                     sample_size=cfg.sample_size, num_projs=cfg.lsh_num_projs,
                                     min_seq_len=cfg.effective_min_seq_len, seed=cfg.seed)


# --- launch plan (any device) --------------------------------------------------------------------

PLAN_SHAPES = [(1, 1, 0), (63, 63, 16), (100, 100, 10), (33, 80, 8), (80, 33, 8), (1025, 1025, 128),
               (300, 700, 64)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("nq,nk,min_len", PLAN_SHAPES, ids=lambda x: str(x))
def test_plan_covers_every_visible_pair_once(nq, nk, min_len, causal):
    plan = kernel_plan(nq, nk, min_len, 16, 8, causal, "cpu")
    counts = torch.zeros(nq, nk, dtype=torch.int32)
    cols = torch.arange(nk)
    for lo, hi, _ in plan.exact:
        counts += ((cols >= lo.long().unsqueeze(1)) & (cols <= hi.long().unsqueeze(1))).int()
    for group in plan.groups:
        for p in group.pieces:
            counts[p.q0:p.q1, p.k0:p.k1] += 1
    rows = torch.arange(nq).unsqueeze(1) + (nk - nq)
    visible = (cols.unsqueeze(0) <= rows) if causal else torch.ones(nq, nk, dtype=torch.bool)
    assert torch.equal(counts, visible.int())
    pieces = (causal_plan if causal else noncausal_plan)(nq, nk, min_len)
    assert plan.num_approx == sum(p.approx for p in pieces)


@pytest.mark.parametrize("nq,nk,min_len", PLAN_SHAPES[1:], ids=lambda x: str(x))
def test_plan_tiles_cover_each_sorted_row_once(nq, nk, min_len):
    block = 16
    plan = kernel_plan(nq, nk, min_len, block, 8, True, "cpu")
    for group in plan.groups:
        tiles = group.tiles.long()
        total_rows = sum(p.q1 - p.q0 for p in group.pieces)
        covered = torch.zeros(total_rows, dtype=torch.int32)
        for r0, r1, k0, k1, piece, _ in tiles.tolist():
            covered[r0:r1] += 1
            assert 0 < k1 - k0 <= block and r1 - r0 <= 128
        assert torch.equal(covered, torch.ones_like(covered))
        # Disjoint query and key ranges within a launch: the in-place merges cannot race.
        for a in group.pieces:
            for b in group.pieces:
                assert a is b or (a.q1 <= b.q0 or b.q1 <= a.q0) and (a.k1 <= b.k0 or b.k1 <= a.k0)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_sample_tables_are_contiguous(hq, hkv):
    from hyperattn.kernels.hyper import _group_samples

    plan = kernel_plan(300, 700, 64, 32, 16, True, "cpu")
    group = max(plan.groups, key=lambda g: len(g.pieces))
    u = draw_randomness(3, 64, 5, plan.num_approx, 1, hq, 16).u
    k_slot = torch.arange(700).expand(hkv, 700)
    tables = _group_samples(group, u, k_slot, 1, hq, hkv, 32)
    # The kernel indexes the tables flat; a permuted view here once mixed up pieces and heads.
    assert len(group.pieces) > 1 and all(t.is_contiguous() for t in tables)


# --- kernels (CUDA) ------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_matches_reference(case, causal, dtype):
    bsz, hq, hkv, nq, nk, dim, block, samples, min_len = case
    q, k, v = qkv(bsz, hq, hkv, nq, nk, dim, dtype=dtype, device="cuda", seed=nq + nk)
    cfg = _config(block, samples, min_len, seed=3)
    out, lse = hyper_attention(q, k, v, causal=causal, config=cfg, return_lse=True)
    ref_out, ref_lse = _reference(q, k, v, causal, cfg)
    assert out.dtype == dtype and torch.isfinite(out).all()
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), visible)
    if dtype == torch.float32:
        assert rel_err(out, ref_out) < FP32_RTOL
        assert rel_err(lse[visible], ref_lse[visible]) < FP32_RTOL
    else:
        exact, _ = attention_lse(q, k, v, q.shape[-1] ** -0.5, causal)
        baseline = rel_err(exact_low_precision(q, k, v, causal), exact)
        assert rel_err(out, ref_out) <= LOWP_FACTOR * baseline


@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("nq,nk", [(1025, 1025), (700, 300), (300, 700)], ids=lambda x: str(x))
def test_full_budget_is_exact(nq, nk, causal):
    q, k, v = qkv(1, 4, 2, nq, nk, 64, device="cuda", seed=7)
    cfg = _config(64, 10**6, 64)
    out, lse = hyper_attention(q, k, v, causal=causal, config=cfg, return_lse=True)
    exact_out, exact_lse = attention_lse(q, k, v, q.shape[-1] ** -0.5, causal)
    visible = torch.isfinite(exact_lse)
    assert rel_err(out, exact_out) < FP32_RTOL
    assert rel_err(lse[visible], exact_lse[visible]) < FP32_RTOL


@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gqa_equals_repeated_kv(causal):
    q, k, v = qkv(1, 8, 2, 1000, 1000, 64, device="cuda", seed=11)
    cfg = _config(32, 16, 64, seed=5)
    out = hyper_attention(q, k, v, causal=causal, config=cfg)
    repeated = hyper_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), causal=causal, config=cfg)
    # Same draws and the same per-KV-head key order: only summation order could differ.
    assert rel_err(out, repeated) < FP32_RTOL


@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_a_slice_of_the_heads_matches_the_reference_on_all_heads(causal):
    # Context parallelism runs each rank's heads alone: the kernels draw per global head too.
    from hyperattn.kernels.hyper import hyper_forward

    q, k, v = qkv(1, 8, 4, 1025, 1025, 64, device="cuda", seed=1)
    cfg = _config(32, 16, 128, seed=3)
    ref_out, ref_lse = _reference(q, k, v, causal, cfg)
    out, lse = hyper_forward(q[:, 4:], k[:, 2:], v[:, 2:], scale=64 ** -0.5, causal=causal, block_size=32,
                             sample_size=16, num_projs=5, min_seq_len=128, seed=3, head_offset=4, total_heads=8)
    assert rel_err(out, ref_out[:, 4:]) < FP32_RTOL
    assert rel_err(lse, ref_lse[:, 4:]) < FP32_RTOL


@needs_cuda
def test_causal_rows_never_see_later_keys():
    n, cut = 1500, 777
    q, k, v = qkv(1, 4, 2, n, n, 64, device="cuda", seed=13)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut:] = torch.randn_like(k2[:, :, cut:]) * 3
    v2[:, :, cut:] = torch.randn_like(v2[:, :, cut:]) * 3
    cfg = _config(32, 16, 64, seed=2)
    out = hyper_attention(q, k, v, causal=True, config=cfg)
    out2 = hyper_attention(q, k2, v2, causal=True, config=cfg)
    assert torch.equal(out[:, :, :cut], out2[:, :, :cut])
    assert not torch.equal(out[:, :, cut:], out2[:, :, cut:])


@needs_cuda
def test_hash_kernel_matches_reference_buckets():
    from hyperattn.kernels.lsh import lsh_sort_keys

    x = torch.randn(2, 3, 999, 128, device="cuda", dtype=torch.bfloat16)
    draws = draw_randomness(0, 128, 7, 1, 1, 1, 1)
    proj = draws.proj.cuda()
    segments = torch.stack([torch.zeros(999, dtype=torch.int32), torch.arange(999, dtype=torch.int32) // 100])
    keys = lsh_sort_keys(x, proj, segments.cuda()).long()
    buckets = lsh_buckets(x, proj).reshape(1, 6, 999)
    # tf32x3 products against cuBLAS fp32: a bit may differ only where x.P is within ~1e-6
    # relative of 0, i.e. for a handful of 6k rows at most.
    assert ((keys & 127) == buckets).float().mean() > 0.999
    assert torch.equal(keys >> 7, segments.cuda().long().unsqueeze(1).expand(-1, 6, -1))


@needs_cuda
def test_unsupported_head_dim_falls_back_to_reference():
    q, k, v = qkv(1, 2, 1, 300, 300, 48, device="cuda", seed=17)
    cfg = _config(32, 16, 64, seed=1)
    with pytest.warns(UserWarning, match="head dim 48"):
        out = hyper_attention(q, k, v, causal=True, config=cfg)
    ref, _ = _reference(q, k, v, True, cfg)
    assert torch.equal(out, ref)


@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_backward_is_the_reference_gradient(causal):
    q, k, v = qkv(1, 4, 2, 400, 400, 64, device="cuda", seed=19)
    grad = torch.randn(1, 4, 400, 64, device="cuda")
    cfg = _config(32, 16, 64, seed=4)
    grads = []
    for run in ("kernel", "reference"):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        if run == "kernel":
            out, lse = hyper_attention(*inputs, causal=causal, config=cfg, return_lse=True)
        else:
            out, lse = _reference(*inputs, causal, cfg)
        ((out * grad).sum() + lse.nan_to_num(0.0, neginf=0.0).sum()).backward()
        grads.append([x.grad for x in inputs])
    for got, want in zip(*grads):
        # Both are the reference's backward on the same draws: equal up to fp32 rounding.
        assert rel_err(got, want) < FP32_RTOL


@needs_cuda
def test_default_config_long_sequence_matches_reference():
    n = 16384
    q, k, v = qkv(1, 4, 1, n, n, 128, dtype=torch.bfloat16, device="cuda", seed=23)
    cfg = HyperAttentionConfig(method="hyper", seed=9)
    out = hyper_attention(q, k, v, causal=True, config=cfg)
    ref, _ = _reference(q, k, v, True, cfg)
    exact, _ = attention_lse(q[:, :, -2048:], k, v, q.shape[-1] ** -0.5, True)
    baseline = rel_err(exact_low_precision(q[:, :, -2048:], k, v, True), exact)
    assert rel_err(out, ref) <= LOWP_FACTOR * baseline
