"""The PyTorch reference of the paper's method against exact attention."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FP32_ATOL, assert_matches_exact, qkv

from hyperattn.reference.exact import attention_lse
from hyperattn.reference.hyper import (
    causal_plan,
    hyper_attention_reference,
    noncausal_plan,
    stratified_samples,
)
from hyperattn.reference.lsh import gray_rank, lsh_buckets


def _hyper(q, k, v, causal, *, block=32, samples=10**9, min_len=40, projs=5, seed=0):
    return hyper_attention_reference(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal, block_size=block,
                                     sample_size=samples, num_projs=projs, min_seq_len=min_len, seed=seed)


def test_gray_rank_orders_patterns_so_neighbours_differ_in_one_bit():
    patterns = torch.arange(256)
    order = torch.argsort(gray_rank(patterns))
    flips = (order[1:] ^ order[:-1]).tolist()
    assert all(bin(f).count("1") == 1 for f in flips)
    assert sorted(gray_rank(patterns).tolist()) == list(range(256))


def test_lsh_same_direction_same_bucket():
    proj = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    x = torch.randn(100, 16)
    assert torch.equal(lsh_buckets(x, proj), lsh_buckets(3.0 * x, proj))


@pytest.mark.parametrize("nq,nk", [(1, 1), (7, 7), (100, 100), (33, 80), (80, 33), (4097, 4097)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("min_len", [0, 16, 1000])
def test_causal_plan_covers_every_visible_pair_once(nq, nk, min_len):
    if nq * nk > 10**6:
        counts = None
    else:
        counts = torch.zeros(nq, nk, dtype=torch.int32)
    total = 0
    for p in causal_plan(nq, nk, min_len):
        assert p.k1 <= p.q0 + (nk - nq) + 1 or p.causal  # off-diagonal pieces only look back
        if p.causal:
            assert p.q1 - p.q0 == p.k1 - p.k0 <= max(min_len, 1) or p.q1 - p.q0 <= min_len
        if counts is not None:
            block = torch.ones(p.q1 - p.q0, p.k1 - p.k0, dtype=torch.int32)
            counts[p.q0:p.q1, p.k0:p.k1] += torch.tril(block) if p.causal else block
        total += (p.q1 - p.q0) * (p.k1 - p.k0) if not p.causal else (p.q1 - p.q0) * (p.q1 - p.q0 + 1) // 2
    visible = sum(max(0, min(nk, i + 1 + nk - nq)) for i in range(nq))
    assert total == visible
    if counts is not None:
        rows = torch.arange(nq).unsqueeze(1) + (nk - nq)
        assert torch.equal(counts, (torch.arange(nk).unsqueeze(0) <= rows).int())


def test_noncausal_plan_is_one_piece():
    (piece,) = noncausal_plan(10, 20, 5)
    assert (piece.q0, piece.q1, piece.k0, piece.k1, piece.approx) == (0, 10, 0, 20, True)


@pytest.mark.parametrize("n,m", [(10, 3), (1000, 256), (257, 256), (5, 5), (5, 9)], ids=lambda x: str(x))
def test_stratified_samples_cover_each_stratum_once(n, m):
    u = torch.rand(4, m, generator=torch.Generator().manual_seed(n))
    idx, logw = stratified_samples(u, n)
    assert idx.min() >= 0 and idx.max() < n
    # Each column's weight is the size of its stratum; the weights sum to n exactly.
    assert torch.allclose(logw.exp().sum(-1), torch.full((4,), float(n)), rtol=1e-5)
    assert all(len(set(row.tolist())) == idx.shape[-1] for row in idx)


CASES = [
    # (B, Hq, Hkv, Nq, Nk, D, causal)
    (1, 2, 2, 200, 200, 16, False),
    (2, 4, 2, 129, 300, 32, False),
    (1, 6, 1, 63, 1025, 16, False),
    (1, 3, 3, 1025, 63, 16, False),
    (1, 4, 2, 200, 200, 16, True),
    (2, 6, 3, 257, 257, 32, True),
    (1, 2, 1, 100, 300, 16, True),
    (1, 2, 2, 300, 100, 16, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}/{c[2]}-{c[3]}x{c[4]}-D{c[5]}-{'causal' if c[6] else 'full'}")
def test_full_budget_is_exact(case):
    b, hq, hkv, nq, nk, d, causal = case
    q, k, v = qkv(b, hq, hkv, nq, nk, d)
    out, lse = _hyper(q, k, v, causal)
    ref_out, ref_lse = attention_lse(q, k, v, d**-0.5, causal)
    assert_matches_exact(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_min_seq_len_at_least_n_is_exact(causal):
    q, k, v = qkv(1, 4, 2, 300, 300, 16)
    out, _ = _hyper(q, k, v, causal, samples=8, min_len=300)
    ref, _ = attention_lse(q, k, v, 0.25, causal)
    assert torch.allclose(out, ref, atol=FP32_ATOL)


def test_causal_changes_after_t_never_reach_t():
    q, k, v = qkv(1, 4, 2, 500, 500, 16, seed=3)
    t = 317
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] = torch.randn_like(k2[:, :, t + 1:])
    v2[:, :, t + 1:] = torch.randn_like(v2[:, :, t + 1:])
    out1, _ = _hyper(q, k, v, True, samples=16, min_len=40)
    out2, _ = _hyper(q, k2, v2, True, samples=16, min_len=40)
    assert torch.equal(out1[:, :, :t + 1], out2[:, :, :t + 1])
    assert not torch.equal(out1[:, :, t + 1:], out2[:, :, t + 1:])


def test_residual_estimator_is_unbiased():
    # exp(lse) estimates the row's partition function sum_j exp(s_ij), and exp(lse) * out the
    # unnormalised output sum_j exp(s_ij) v_j: the block part is exact and the stratified
    # samples carry inclusion weights, so both are unbiased over seeds.
    q, k, v = qkv(1, 2, 2, 256, 256, 8, seed=5)
    ref_out, ref_lse = attention_lse(q, k, v, 8**-0.5)
    ref_z, ref_num = ref_lse.double().exp(), ref_lse.double().exp().unsqueeze(-1) * ref_out.double()
    zs, nums = [], []
    for seed in range(400):
        out, lse = _hyper(q, k, v, False, block=32, samples=16, min_len=0, projs=3, seed=seed)
        z = lse.double().exp()
        zs.append(z)
        nums.append(z.unsqueeze(-1) * out.double())
    zs, nums = torch.stack(zs), torch.stack(nums)
    # Mean over 400 seeds within 5 standard errors of the exact value, for every entry
    # (a biased estimator of a few % would fail this on many of the 512 rows).
    for est, ref in ((zs, ref_z), (nums, ref_num)):
        stderr = est.std(0) / math.sqrt(est.shape[0])
        assert bool(((est.mean(0) - ref).abs() <= 5 * stderr + 1e-9).all())
    # The estimate is really random (the test would pass trivially on an exact method).
    assert float(zs.std(0).max()) > 0


def test_planted_matches_are_found_by_lsh():
    # Each query is a scaled copy of one key: same direction, same bucket, so sortLSH puts
    # the pair in the same block unless a block boundary cuts through their bucket. Most
    # rows are then near exact; a method without LSH (samples only) gets none of them.
    gen = torch.Generator().manual_seed(0)
    n, d = 2048, 32
    k = torch.randn(1, 1, n, d, generator=gen)
    v = torch.randn(1, 1, n, d, generator=gen)
    q = 4.0 * k[:, :, torch.randperm(n, generator=gen)]
    out, _ = _hyper(q, k, v, False, block=128, samples=128, min_len=0, projs=6)
    ref, _ = attention_lse(q, k, v, d**-0.5)
    row_err = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert float(row_err.median()) < 0.05
    blind, _ = _hyper(q, k, v, False, block=1, samples=128, min_len=0, projs=6)
    assert float(((blind - ref).norm(dim=-1) / ref.norm(dim=-1)).median()) > 0.5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_a_slice_of_the_heads_is_that_slice_of_the_call_on_all_heads(causal):
    # Context parallelism runs each rank's heads alone: the draws are per global head.
    q, k, v = qkv(2, 8, 4, 300, 300, 16)
    full_out, full_lse = _hyper(q, k, v, causal, samples=16)
    out, lse = hyper_attention_reference(q[:, 4:], k[:, 2:], v[:, 2:], scale=0.25, causal=causal, block_size=32,
                                         sample_size=16, num_projs=5, min_seq_len=40, seed=0, head_offset=4,
                                         total_heads=8)
    assert torch.allclose(out, full_out[:, 4:], atol=FP32_ATOL)
    assert torch.allclose(lse, full_lse[:, 4:], atol=FP32_ATOL)
    unsliced, _ = hyper_attention_reference(q[:, 4:], k[:, 2:], v[:, 2:], scale=0.25, causal=causal, block_size=32,
                                            sample_size=16, num_projs=5, min_seq_len=40, seed=0)
    assert not torch.allclose(unsliced, full_out[:, 4:], atol=1e-3)  # heads 0-3's draws: another answer
