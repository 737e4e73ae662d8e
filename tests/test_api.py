"""The public contract: shapes, dtypes, GQA, determinism, stats, gradients, bad input."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FP32_ATOL, qkv, rel_err

import hyperattn as ha
from hyperattn.reference.exact import attention_lse

FULL = ha.HyperAttentionConfig(method="hyper", min_seq_len=0, block_size=32, sample_size=10**6, seed=0)
APPROX = ha.HyperAttentionConfig(method="hyper", min_seq_len=64, block_size=32, sample_size=32, lsh_num_projs=4,
                                 seed=0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_output_shape_dtype_and_lse(dtype, causal):
    q, k, v = qkv(2, 4, 2, 150, 150, 16, dtype)
    out, lse, stats = ha.hyper_attention(q, k, v, causal=causal, config=APPROX, return_lse=True, return_stats=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 4, 150) and lse.dtype == torch.float32
    assert stats.est_error.shape == (2, 4) and stats.exact_heads.shape == (2, 4)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_equals_repeated_kv(causal):
    q, k, v = qkv(1, 6, 2, 300, 300, 16, seed=1)
    out = ha.hyper_attention(q, k, v, causal=causal, config=APPROX)
    rep = ha.hyper_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=causal, config=APPROX)
    assert torch.allclose(out, rep, atol=FP32_ATOL)
    assert rel_err(out, ha.exact_attention(q, k, v, causal=causal)) > 1e-3  # really approximate


def test_fixed_seed_is_deterministic_and_seeds_differ():
    q, k, v = qkv(1, 2, 2, 300, 300, 16, seed=2)
    a = ha.hyper_attention(q, k, v, config=APPROX)
    assert torch.equal(a, ha.hyper_attention(q, k, v, config=APPROX))
    assert not torch.equal(a, ha.hyper_attention(q, k, v, config=APPROX.replace(seed=1)))


def test_seed_none_follows_torch_manual_seed():
    q, k, v = qkv(1, 2, 2, 300, 300, 16, seed=2)
    cfg = APPROX.replace(seed=None)
    torch.manual_seed(7)
    a = ha.hyper_attention(q, k, v, config=cfg)
    torch.manual_seed(7)
    assert torch.equal(a, ha.hyper_attention(q, k, v, config=cfg))


def test_return_forms():
    q, k, v = qkv(1, 2, 2, 64, 64, 8)
    assert isinstance(ha.hyper_attention(q, k, v, config=FULL), torch.Tensor)
    assert len(ha.hyper_attention(q, k, v, config=FULL, return_lse=True)) == 2
    assert len(ha.hyper_attention(q, k, v, config=FULL, return_lse=True, return_stats=True)) == 3


def test_keys_per_query_accounting():
    q, k, v = qkv(1, 2, 2, 512, 512, 8)
    cfg = ha.HyperAttentionConfig(method="hyper", min_seq_len=128, block_size=32, sample_size=16, seed=0)
    _, stats = ha.hyper_attention(q, k, v, causal=True, config=cfg, return_stats=True)
    # 4 exact causal diagonal blocks of 128 (64.5 keys/query on average) and approximate
    # off-diagonal pieces (32 block + 16 samples per query) for the queries past 128.
    exact = 512 * (512 + 1) / 2 / 512
    assert 32 < stats.keys_per_query < exact
    _, exact_stats = ha.hyper_attention(q, k, v, causal=True, config=cfg.replace(method="exact"), return_stats=True)
    assert exact_stats.keys_per_query == pytest.approx(exact)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradient_with_full_budget_is_exact_gradient(causal):
    q, k, v = qkv(1, 4, 2, 96, 96, 8, seed=3)
    grads = []
    for fn in (lambda a, b, c: ha.hyper_attention(a, b, c, causal=causal, config=FULL),
               lambda a, b, c: attention_lse(a, b, c, 8**-0.5, causal)[0]):
        a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
        (fn(a, b, c) * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append((a.grad, b.grad, c.grad))
    for g, ref in zip(*grads):
        assert torch.allclose(g, ref, atol=1e-4)


def test_gradient_of_approximation_flows():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 1, 200, 200, 8, seed=4))
    ha.hyper_attention(q, k, v, causal=True, config=APPROX).square().sum().backward()
    assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_exact_attention_matches_reference():
    q, k, v = qkv(2, 4, 2, 70, 90, 16)
    ref_out, ref_lse = attention_lse(q, k, v, 0.25, causal=True)
    out, lse = ha.exact_attention(q, k, v, causal=True, return_lse=True)
    assert torch.allclose(out, ref_out, atol=FP32_ATOL) and torch.allclose(lse, ref_lse, atol=FP32_ATOL)
    q, k, v = qkv(2, 4, 2, 90, 90, 16)
    assert torch.allclose(ha.exact_attention(q, k, v, causal=True), attention_lse(q, k, v, 0.25, True)[0],
                          atol=FP32_ATOL)


def _sweep_cases(count=36, seed=0):
    rnd = random.Random(seed)
    cases = []
    for i in range(count):
        hkv = rnd.choice([1, 2, 3])
        group = rnd.choice([1, 2, 4])
        causal = rnd.random() < 0.5
        block = rnd.choice([16, 32, 64])
        min_len = rnd.choice([16, 64, 100, 128])  # 0 would unroll causal calls into ~n pieces: slow, not new
        # Lengths near block and min_seq_len boundaries, odd ones, and Nq != Nk.
        n = rnd.choice([1, 63, 64, 65, min_len, min_len + 1, 2 * block - 1, 2 * block + 1, 257, 300])
        n = max(n, 1)
        nq = n if rnd.random() < 0.5 else max(1, n + rnd.choice([-40, -7, 5, 33]))
        dim = rnd.choice([8, 16, 32, 48])
        dtype = rnd.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
        cases.append((i, 1 + i % 2, hkv * group, hkv, nq, n, dim, causal, block, min_len, dtype))
    return cases


@pytest.mark.parametrize("case", _sweep_cases(),
                         ids=lambda c: f"{c[0]}-H{c[2]}/{c[3]}-{c[4]}x{c[5]}-D{c[6]}-b{c[8]}-min{c[9]}-"
                                       f"{'causal' if c[7] else 'full'}-{str(c[10])[6:]}")
def test_randomized_sweep(case):
    i, b, hq, hkv, nq, nk, dim, causal, block, min_len, dtype = case
    q, k, v = qkv(b, hq, hkv, nq, nk, dim, dtype, seed=i)
    exact = attention_lse(q, k, v, dim**-0.5, causal)[0]
    full = ha.HyperAttentionConfig(method="hyper", block_size=block, min_seq_len=min_len, sample_size=10**6, seed=i)
    # Full budget: exact up to the input dtype's rounding of the output (fp32: a few ulps;
    # bf16/fp16: one rounding of values of magnitude <~ 3, i.e. 2**-8 * 3 and 2**-11 * 3).
    tol = {torch.float32: FP32_ATOL, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert torch.allclose(ha.hyper_attention(q, k, v, causal=causal, config=full).float(), exact, atol=tol)
    # Approximate: every row is a convex combination of value rows (both parts are
    # softmax-normalised and merged with positive weights), so each coordinate lies
    # within the values' range; rows with no visible key (causal, Nq > Nk) are 0.
    approx = ha.hyper_attention(q, k, v, causal=causal, config=full.replace(sample_size=8)).float()
    assert bool(torch.isfinite(approx).all())
    vmin = v.float().amin(dim=2).repeat_interleave(hq // hkv, 1).unsqueeze(2)
    vmax = v.float().amax(dim=2).repeat_interleave(hq // hkv, 1).unsqueeze(2)
    assert bool(((approx >= vmin - tol) & (approx <= vmax + tol)).all())


GOOD = qkv(1, 4, 2, 32, 32, 8)


def _with(**changes):
    q, k, v = GOOD
    args = {"q": q, "k": k, "v": v}
    args.update(changes)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_with(q=GOOD[0][0]), ValueError, r"q: expected a 4-D tensor"),
    (_with(k=GOOD[1][0]), ValueError, r"k: expected a 4-D tensor"),
    (_with(v=GOOD[2][0]), ValueError, r"v: expected a 4-D tensor"),
    (_with(q=[1, 2]), TypeError, r"q: expected a torch.Tensor"),
    (_with(q=GOOD[0].long()), TypeError, r"q: expected dtype"),
    (_with(k=GOOD[1].half()), TypeError, r"k: expected dtype torch.float32"),
    (_with(k=torch.randn(2, 2, 32, 8), v=torch.randn(2, 2, 32, 8)), ValueError, r"k: expected .*B == q's 1"),
    (_with(k=torch.randn(1, 2, 32, 4), v=torch.randn(1, 2, 32, 4)), ValueError, r"k: expected .*D == q's 8"),
    (_with(k=torch.randn(1, 3, 32, 8), v=torch.randn(1, 3, 32, 8)), ValueError, r"k: expected a head count Hkv"),
    (_with(v=torch.randn(1, 2, 31, 8)), ValueError, r"v: expected the same shape as k"),
    (_with(q=torch.randn(1, 4, 0, 8)), ValueError, r"q: expected a non-empty"),
    (_with(k=torch.randn(1, 2, 0, 8), v=torch.randn(1, 2, 0, 8)), ValueError, r"k: expected .*no empty"),
    (_with(q=GOOD[0].clone().index_fill_(2, torch.tensor([3]), float("nan"))), ValueError, r"q: expected finite"),
    (_with(v=GOOD[2].clone().index_fill_(2, torch.tensor([3]), float("inf"))), ValueError, r"v: expected finite"),
    (_with(causal=1), TypeError, r"causal: expected a bool"),
    (_with(scale=-1.0), ValueError, r"scale: expected a finite float > 0"),
    (_with(scale="x"), TypeError, r"scale: expected a float"),
    (_with(config={"method": "hyper"}), TypeError, r"config: expected a HyperAttentionConfig"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        ha.hyper_attention(**args)


def test_finite_check_can_be_skipped():
    q, k, v = GOOD
    bad = q.clone()
    bad[0, 0, 0, 0] = float("nan")
    cfg = FULL.replace(check_finite=False)
    out = ha.hyper_attention(bad, k, v, config=cfg)
    assert bool(torch.isnan(out[0, 0, 0]).any())


def test_finite_check_accepts_float64_values_beyond_float32s_range():
    # The check's peaks are float64 for float64 inputs: 1e300 is finite, not an overflow.
    q, k, v = (x.double() for x in GOOD)
    out = ha.hyper_attention(q, k, v * 1e300, config=FULL)
    assert bool(torch.isfinite(out).all()) and out.abs().max() > 1e299


def test_exact_attention_validates_too():
    q, k, v = GOOD
    with pytest.raises(ValueError, match="k: expected a head count"):
        ha.exact_attention(q, torch.randn(1, 3, 32, 8), torch.randn(1, 3, 32, 8))


@pytest.mark.parametrize("limit", [11 * 700 * 3, 1], ids=["kv-group-chunks", "single-head-chunks"])
def test_peer_patterns_run_in_head_chunks_when_masks_are_large(monkeypatch, limit):
    from hyperattn.methods import peers

    q, k, v = qkv(2, 6, 2, 700, 700, 16, seed=9)
    cfg = ha.HyperAttentionConfig(method="vertical_slash", min_seq_len=128, seed=3)
    whole = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    monkeypatch.setattr(peers, "_MASK_ELEMENTS", limit)
    out, lse, stats = ha.hyper_attention(q, k, v, causal=True, config=cfg, return_lse=True, return_stats=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert stats.est_error.shape == (2, 6) and stats.exact_heads.shape == (2, 6)
    assert 0 < stats.keys_per_query < 700
    assert torch.allclose(out, whole, atol=FP32_ATOL)  # a deterministic pattern: chunks change nothing


def test_structured_needs_no_head_chunks(monkeypatch):
    # It works on index lists in chunks of query blocks: the mask bound of the peers does not apply.
    from hyperattn.methods import peers

    q, k, v = qkv(2, 6, 2, 700, 700, 16, seed=9)
    cfg = ha.HyperAttentionConfig(min_seq_len=128, seed=3)
    whole = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    monkeypatch.setattr(peers, "_MASK_ELEMENTS", 1)
    assert torch.equal(ha.hyper_attention(q, k, v, causal=True, config=cfg), whole)
    full = ha.hyper_attention(q, k, v, causal=True, config=cfg.replace(sample_size=10**6))
    assert torch.allclose(full, ha.exact_attention(q, k, v, causal=True), atol=FP32_ATOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_method_without_kernels_warns_on_long_cuda_inputs(monkeypatch):
    from hyperattn.methods import peers

    monkeypatch.setattr(peers, "_SLOW_ON_CUDA", 128)
    q, k, v = qkv(1, 2, 1, 256, 256, 32, device="cuda")
    with pytest.warns(UserWarning, match="no GPU kernel") as caught:
        ha.hyper_attention(q, k, v, causal=True, config=ha.HyperAttentionConfig(method="streaming", seed=0))
    assert caught[0].filename == __file__  # it points at the caller's line


@pytest.mark.parametrize("method", ha.METHODS)
def test_meta_tensors_give_shapes_without_computing(method):
    # Issue 13: the finite check copied meta tensors to the host ("Cannot copy out of meta tensor").
    q = torch.empty(2, 4, 300, 16, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 2, 280, 16, device="meta", dtype=torch.bfloat16)
    out, lse, stats = ha.hyper_attention(q, k, k, causal=True, config=ha.HyperAttentionConfig(method=method),
                                         return_lse=True, return_stats=True)
    assert (out.shape, out.dtype, out.device.type) == ((2, 4, 300, 16), torch.bfloat16, "meta")
    assert (lse.shape, lse.dtype, lse.device.type) == ((2, 4, 300), torch.float32, "meta")
    assert stats.method == method and stats.est_error.shape == (2, 4) and stats.exact_heads.dtype == torch.bool
    assert ha.exact_attention(q, k, k, causal=True).shape == (2, 4, 300, 16)


def test_fake_tensors_trace_through_the_default_config():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(1, 4, 300, 16), torch.empty(1, 2, 300, 16)
        out = ha.hyper_attention(q, k, k, causal=True)
    assert isinstance(out, FakeTensor) and out.shape == (1, 4, 300, 16)


@pytest.mark.parametrize("n", [64, 2048], ids=["below-crossover", "approximate"])
def test_non_finite_inputs_raise_on_both_paths_of_the_default(n):
    # Below the crossover the finite check runs after the exact call is queued (it overlaps
    # the call); it must still raise before anything is returned.
    q, k, v = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    k[0, 1, n // 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"k: expected finite"):
        ha.hyper_attention(q, k, v, causal=True, config=ha.HyperAttentionConfig(seed=0))
