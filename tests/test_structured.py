"""The structured method: exactness with a full budget, unbiased residual, guard, stats, needle retrieval."""

from __future__ import annotations

import math

import pytest
import torch

import hyperattn as ha
from conftest import assert_matches_exact, FP32_ATOL, qkv, rel_err
from hyperattn.methods import structured
from hyperattn.reference import selection as S
from hyperattn.reference.exact import attention_lse

# Small budgets so that short test sequences really approximate.
SMALL = dict(query_block=16, key_blocks=2, window=16, num_sinks=2, heavy_columns=4, lsh_block=8, sample_size=16,
             probe_rows=8, min_seq_len=32, chunk=128, score_group=4)


def _cfg(**changes):
    return ha.HyperAttentionConfig(**{**SMALL, "seed": 0, "max_error": None, **changes})


SHAPES = [
    pytest.param(1, 2, 2, 63, 63, id="N63"),
    pytest.param(2, 4, 2, 200, 200, id="gqa-N200"),
    pytest.param(1, 4, 1, 150, 333, id="mqa-Nq150-Nk333"),
    pytest.param(1, 2, 2, 257, 97, id="Nq257-Nk97"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("batch,hq,hkv,nq,nk", SHAPES)
def test_full_budget_is_exact(batch, hq, hkv, nq, nk, causal):
    q, k, v = qkv(batch, hq, hkv, nq, nk, 16)
    cfg = _cfg(sample_size=nk)  # m >= |C_j|: every residual column once with weight 1
    out, lse = ha.hyper_attention(q, k, v, causal=causal, config=cfg, return_lse=True)
    ref, ref_lse = attention_lse(q, k, v, 16 ** -0.5, causal)
    assert_matches_exact(out, lse, ref, ref_lse)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_short_sequences_are_exact(causal):
    q, k, v = qkv(1, 2, 1, 100, 100, 16)
    out, stats = ha.hyper_attention(q, k, v, causal=causal, config=_cfg(min_seq_len=128), return_stats=True)
    assert torch.allclose(out, attention_lse(q, k, v, 0.25, causal)[0], atol=FP32_ATOL)
    assert stats.keys_per_query == pytest.approx(50.5 if causal else 100.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_matches_fp32_reference(dtype):
    q, k, v = qkv(1, 2, 2, 300, 300, 32)
    cfg = _cfg()
    ref = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    out = ha.hyper_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, config=cfg)
    assert out.dtype == dtype
    # Same draws; the only difference is input rounding (bf16 eps 2^-8) and output rounding,
    # a few times eps relative, unless rounding flips a selection (rare at these sizes).
    assert rel_err(out.float(), ref) < 0.05


def test_residual_estimate_is_unbiased():
    # exp(lse) of an approximate row is exact-part mass + a Horvitz-Thompson/Hansen-Hurwitz
    # sum over the residual: its mean over seeds is the exact partition function.
    q, k, v = qkv(1, 1, 1, 256, 256, 16, seed=3)
    q, k = q * 0.5, k * 0.5
    ref = attention_lse(q, k, v, 0.25, True)[1]
    ratios = []
    for seed in range(100):
        _, lse = ha.hyper_attention(q, k, v, causal=True, config=_cfg(seed=seed), return_lse=True)
        ratios.append(torch.exp(lse - ref)[..., 64:])
    mean = torch.stack(ratios).mean(0)
    # Per-row relative std of one draw is ~0.1 here; 100 seeds bring a row's mean to ~0.01
    # (0.05 is 5 sigma) and the average over 192 rows far below 0.01; a real bias (dropped
    # or double-counted columns) shifts it by several %.
    assert float(mean.mean()) == pytest.approx(1.0, abs=0.01)
    assert float((mean - 1).abs().max()) < 0.05


def test_same_seed_same_result_and_gqa_shares_columns_per_kv_head():
    q, k, v = qkv(1, 4, 2, 300, 300, 16)
    cfg = _cfg()
    a = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    b = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    assert torch.equal(a, b)
    # The query heads of a KV head share its gathered columns (one copy of K/V per KV head),
    # so GQA is its own selection, not that of repeated K/V; both estimate the same attention.
    rep = ha.hyper_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True, config=cfg)
    ref = attention_lse(q, k, v, 0.25, True)[0]
    assert abs(rel_err(a, ref) - rel_err(rep, ref)) < 0.5 * rel_err(rep, ref)


def test_rows_read_only_visible_values():
    # Selection looks at q and k only, so changing V after position t leaves rows <= t
    # unchanged: no value of a future token reaches an earlier output.
    q, k, v = qkv(1, 2, 2, 300, 300, 16)
    cfg = _cfg()
    t = 180
    v2 = v.clone()
    v2[:, :, t + 1:] = 1e3
    a = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    b = ha.hyper_attention(q, k, v2, causal=True, config=cfg)
    assert torch.allclose(a[:, :, :t + 1], b[:, :, :t + 1], atol=FP32_ATOL)
    assert not torch.allclose(a[:, :, t + 1:], b[:, :, t + 1:])


def test_stats_contract():
    q, k, v = qkv(2, 4, 2, 400, 400, 16)
    out, stats = ha.hyper_attention(q, k, v, causal=True, config=_cfg(), return_stats=True)
    assert stats.method == "structured"
    assert stats.est_error.shape == (2, 4) and stats.exact_heads.shape == (2, 4)
    assert stats.exact_heads.dtype == torch.bool and not bool(stats.exact_heads.any())
    assert bool(torch.isfinite(stats.est_error).all()) and bool((stats.est_error >= 0).all())
    # Approximate: fewer scores than exact causal attention ((N + 1) / 2 per query).
    assert 0 < stats.keys_per_query < 200.5


def test_estimated_error_tracks_true_error():
    q, k, v = qkv(1, 4, 4, 600, 600, 16, seed=5)
    out, stats = ha.hyper_attention(q, k, v, causal=True, config=_cfg(probe_rows=64), return_stats=True)
    ref = attention_lse(q, k, v, 0.25, True)[0]
    true = ((out - ref)[..., 32:, :].pow(2).sum((-1, -2)) / ref[..., 32:, :].pow(2).sum((-1, -2))).sqrt()
    # 64 probe rows estimate a Frobenius ratio over ~570 rows; within a factor 2 per head.
    ratio = stats.est_error / true
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), ratio


def test_error_bound_of_even_errors_is_the_estimate():
    # Every probe block with the same error ratio: the clusters agree, the bound is the
    # estimate, and both are the Frobenius ratio over the valid rows.
    ref = torch.randn(1, 1, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    approx = ref * 1.1
    valid = torch.ones(1, 1, 2, 8, dtype=torch.bool)
    valid[..., -2:] = False  # a block without valid rows is not a cluster
    est, bound = structured._rel_error(approx, ref, valid, 2)
    assert torch.allclose(est, torch.full_like(est, 0.1), rtol=1e-5)
    assert torch.allclose(bound, est, rtol=1e-5)


def test_error_bound_covers_a_heavy_tailed_chunk():
    # A chunk of 32 blocks of 2 rows whose error scale is lognormal over blocks (real heads'
    # errors are heavy-tailed over blocks, docs/QUALITY.md); the guard sees 16 of them. Over
    # 2000 such draws the estimate falls below the chunk's true ratio about half the time;
    # the bound (nominal 90%, normal approximation) covers it in >= 70% of them (76%
    # measured: heavy tails make the normal approximation optimistic) and is never below
    # the estimate.
    gen = torch.Generator().manual_seed(0)
    blocks, rpb, draws = 32, 2, 2000
    ref = torch.randn(blocks * rpb, 16, generator=gen)
    scale = torch.exp(torch.randn(blocks, generator=gen)).repeat_interleave(rpb) * 0.05
    approx = ref + torch.randn(blocks * rpb, 16, generator=gen) * scale[:, None]
    true = ((approx - ref).pow(2).sum() / ref.pow(2).sum()).sqrt()
    valid = torch.zeros(draws, blocks, rpb, dtype=torch.bool)
    for i in range(draws):
        valid[i, torch.randperm(blocks, generator=gen)[:16]] = True
    valid = valid.reshape(draws, blocks * rpb)
    est, bound = structured._rel_error(approx.expand(draws, -1, -1), ref.expand(draws, -1, -1), valid, rpb)
    assert 0.4 < float((est >= true).float().mean()) < 0.6
    assert float((bound >= true).float().mean()) >= 0.7
    assert bool((bound >= est).all())


@pytest.mark.parametrize("max_error,all_exact", [(1e-9, True), (1e9, False)], ids=["tiny", "huge"])
def test_guard(max_error, all_exact, monkeypatch):
    # With only the base budget to try, a head over the target must run exact.
    monkeypatch.setattr(structured, "TIERS", (1.0,))
    q, k, v = qkv(1, 4, 2, 400, 400, 16)
    free = ha.hyper_attention(q, k, v, causal=True, config=_cfg())
    out, stats = ha.hyper_attention(q, k, v, causal=True, config=_cfg(max_error=max_error), return_stats=True)
    ref = attention_lse(q, k, v, 0.25, True)[0]
    if all_exact:
        assert bool(stats.exact_heads.all())
        assert torch.allclose(out, ref, atol=FP32_ATOL)
        assert float(stats.est_error.abs().max()) == 0.0
    else:
        assert not bool(stats.exact_heads.any())
        assert torch.equal(out, free)


def test_guard_escalates_before_exact():
    # A target between the small budget's error and zero: heads take a larger budget, and
    # the estimate after the guard meets the target (or the head is exact).
    q, k, v = qkv(1, 4, 2, 600, 600, 16, seed=2)
    _, loose = ha.hyper_attention(q, k, v, causal=True, config=_cfg(), return_stats=True)
    target = float(loose.est_error.min()) * 0.8
    _, stats = ha.hyper_attention(q, k, v, causal=True, config=_cfg(max_error=target), return_stats=True)
    assert bool((stats.est_error <= target).all())
    assert stats.keys_per_query > loose.keys_per_query


def test_guard_takes_cheaper_tiers_for_easy_heads():
    # A loose target is met by the cheapest tier: fewer scores than the base budget, and
    # the estimate reported is the one the guard decided on.
    q, k, v = qkv(1, 4, 2, 600, 600, 16, seed=2)
    _, base = ha.hyper_attention(q, k, v, causal=True, config=_cfg(), return_stats=True)
    target = float(base.est_error.max()) * 4
    _, stats = ha.hyper_attention(q, k, v, causal=True, config=_cfg(max_error=target), return_stats=True)
    assert not bool(stats.exact_heads.any())
    assert bool((stats.est_error <= target).all())
    assert stats.keys_per_query < base.keys_per_query


def _needle(n=2048, dim=32, needle=100, seed=0):
    """Random heads where the last 128 queries point at one key far back (a passkey)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n, dim, generator=gen) * 0.3
    k = torch.randn(1, 2, n, dim, generator=gen) * 0.3
    v = torch.randn(1, 2, n, dim, generator=gen)
    direction = torch.randn(dim, generator=gen)
    k[:, :, needle] = direction
    q[:, :, -128:] = direction * 3.0  # logit ~ 3 * |d|^2 / sqrt(D) ~ 16: the needle holds the row
    v[:, :, needle] = 10.0
    return q, k, v


def test_needle_far_back_is_found():
    q, k, v = _needle()
    ref = attention_lse(q, k, v, 32 ** -0.5, True)[0][:, :, -128:]
    common = dict(seed=0, max_error=None, min_seq_len=512)
    structured = ha.hyper_attention(q, k, v, causal=True, config=ha.HyperAttentionConfig(**common))[:, :, -128:]
    streaming = ha.hyper_attention(q, k, v, causal=True, config=ha.HyperAttentionConfig(
        method="streaming", num_sinks=4, window=1024, **common))[:, :, -128:]
    # The needle is ~1950 positions back: sinks + window cannot see it, the block scores do.
    assert rel_err(streaming, ref) > 0.5
    assert rel_err(structured, ref) < 0.05


def test_single_row_needles_are_found_by_the_lsh_block():
    # Harder than above: each needle is wanted by one query row only, so neither the block
    # scores (8 pooled rows against 64 pooled keys) nor the block probe see it; the row's
    # own LSH bucket does. Measured (guard off): error on those rows 0.48 without the LSH
    # block, 0.0 with lsh_block=32 (the default); streaming 1.0.
    n, dim = 2048, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, n, dim, generator=gen) * 0.3
    k = torch.randn(1, 2, n, dim, generator=gen) * 0.3
    v = torch.randn(1, 2, n, dim, generator=gen)
    rows = torch.arange(n - 512 + 37, n, 64)  # one row per query block, > 1400 keys after its needle
    needles = 100 + 97 * torch.arange(len(rows))
    for row, needle in zip(rows, needles):
        # The needle key is no longer than the others (so no probe row finds it a heavy
        # column); the one row that wants it scores it ~11, far above its ~1500 other keys.
        direction = torch.randn(dim, generator=gen) * 0.3
        k[:, :, needle], q[:, :, row], v[:, :, needle] = direction, direction * 15.0, 10.0
    ref = attention_lse(q, k, v, dim ** -0.5, True)[0][:, :, rows]
    errors = {}
    for lsh in (0, ha.HyperAttentionConfig().lsh_block):
        cfg = ha.HyperAttentionConfig(seed=0, max_error=None, min_seq_len=512, lsh_block=lsh)
        errors[lsh] = rel_err(ha.hyper_attention(q, k, v, causal=True, config=cfg)[:, :, rows], ref)
    assert errors[0] > 0.3
    assert max(errors) > 0 and errors[max(errors)] < 0.05


def test_estimator_and_guard_fields_validated():
    with pytest.raises(ValueError, match="sample_mix"):
        ha.HyperAttentionConfig(sample_mix=0.0)
    with pytest.raises(TypeError, match="query_block"):
        ha.HyperAttentionConfig(query_block=1.5)
    with pytest.raises(ValueError, match="key_blocks"):
        ha.HyperAttentionConfig(key_blocks=-1)
    with pytest.raises(ValueError, match="heavy_span"):
        ha.HyperAttentionConfig(heavy_span=-1)
    with pytest.raises(TypeError, match="heavy_span"):
        ha.HyperAttentionConfig(heavy_span=4096.0)
    assert math.isclose(ha.HyperAttentionConfig().sample_mix, 0.3)
    assert ha.HyperAttentionConfig(heavy_span=None).heavy_span is None


@pytest.mark.parametrize("span", [None, 200], ids=["all-keys", "heavy-span"])
@pytest.mark.parametrize("max_error", [None, 0.05], ids=["fixed", "guarded"])
@pytest.mark.parametrize("part", ["q", "k", "v"])
def test_chunk_causal(part, max_error, span):
    # Rows before a multiple t of the chunk never depend on q, k or v at positions >= t:
    # selection, heavy columns (over the whole prefix or a span of it), probe rows and the
    # guard's tier are all decided per chunk.
    q, k, v = qkv(1, 4, 2, 900, 900, 16, seed=4)
    cfg = _cfg(chunk=128, max_error=max_error, probe_rows=8, heavy_span=span)
    base = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    for t in (256, 512):
        x = {"q": q, "k": k, "v": v}
        changed = x[part].clone()
        changed[:, :, t:] = torch.randn_like(changed[:, :, t:]) * 3
        x[part] = changed
        out = ha.hyper_attention(x["q"], x["k"], x["v"], causal=True, config=cfg)
        assert torch.equal(out[:, :, :t], base[:, :, :t]), (part, t)
        assert not torch.equal(out[:, :, t:], base[:, :, t:])


@pytest.mark.parametrize("max_error", [None, 0.05], ids=["fixed", "guarded"])
def test_chunked_prefill_reproduces_full_prefill(max_error):
    q, k, v = qkv(1, 4, 2, 900, 900, 16, seed=6)
    cfg = _cfg(chunk=128, max_error=max_error, probe_rows=8)
    full = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    for t in (256, 640):
        prefix = ha.hyper_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], causal=True, config=cfg)
        assert torch.allclose(prefix, full[:, :, :t], atol=FP32_ATOL)


@pytest.mark.model
def test_chunk_causal_on_a_real_head_with_the_guard(embedded):
    # A real captured head (sinks, delimiters, local mass), the default guard on: changing q,
    # k or v after t = 2 chunks leaves every earlier row bit-identical.
    from hyperattn.eval.capture import capture_qkv
    from hyperattn.eval.text import tokenize_text

    model, tokenizer = embedded
    cap = capture_qkv(model, tokenize_text(tokenizer, "argparse", 1536), layers=[14])
    q, k, v = cap.layers[14]
    cfg = ha.HyperAttentionConfig(seed=0, min_seq_len=256, chunk=512)
    base, stats = ha.hyper_attention(q, k, v, causal=True, scale=cap.scale, config=cfg, return_stats=True)
    t = 1024
    for part in range(3):
        x = [q, k, v]
        x[part] = x[part].clone()
        x[part][:, :, t:] = x[part][:, :, t:].flip(2)
        out = ha.hyper_attention(*x, causal=True, scale=cap.scale, config=cfg)
        assert torch.equal(out[:, :, :t], base[:, :, :t]), part


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_kernel_masks_match_reference_on_cpu(causal, monkeypatch):
    # FlexAttention's eager path applies each pass's mask_mod and score_mod to every score,
    # so the kernel module's masks, lists and LSE merge are checked here without a GPU; the
    # block sparsity itself is checked on CUDA (tests/test_structured_kernels.py).
    from torch.nn.attention.flex_attention import flex_attention

    from hyperattn.kernels import structured as ker
    from hyperattn.reference import structured as ref_attend

    def eager(name):
        def run(q, k, v, score_mod, block_mask, scale, enable_gqa, kernel_options=None):
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=enable_gqa, return_lse=True)
        return run

    monkeypatch.setattr(ker, "_flex", eager)
    q, k, v = qkv(1, 4, 2, 700, 900, 32, seed=1)
    scale = 32 ** -0.5
    plan = S.make_plan(700, 900, causal, 128, 128, 512, 256)
    heads, kv_heads = torch.arange(4), torch.arange(2)
    probe = S.probe_rows(plan, 0, 1, heads, 2, 4)
    heavy = S.probe_exact(q, k, v, scale, plan, probe, 16, 4, 2)[2]
    lsh = S.lsh_ranges(q, k, plan, 32, 7, 0)
    blocks = torch.arange(plan.first, plan.nqb).expand(1, 4, -1)
    scores = S.block_scores(S.pool(q, k, plan, 16), scale, plan, blocks)
    g_idx, g_logw = S.gather_columns(plan, S.chunk_scores(scores, plan.first, plan, 2), heavy,
                                     torch.full((1, 2, plan.num_chunks), 96), 96, 4, 0.3, 0, kv_heads)
    exact = S.exact_blocks(plan, blocks, S.rank_blocks(scores, 2), torch.full_like(blocks, 2))
    sel = S.Selection(blocks, exact, torch.ones_like(blocks, dtype=torch.bool), g_idx, g_logw)
    out_r, lse_r = ref_attend.attend(q, k, v, scale, plan, sel, lsh)
    out_k, lse_k = ker.attend_flex(q, k, v, scale, plan, sel, lsh)
    assert rel_err(out_k, out_r) < 2e-5  # the same terms in another order, three LSE merges
    finite = torch.isfinite(lse_r)
    assert torch.equal(finite, torch.isfinite(lse_k))
    assert float((lse_k - lse_r)[finite].abs().max()) < 1e-4



def test_output_does_not_depend_on_asking_for_stats():
    # Without the guard the probe rows' trial only estimates the error; skipping it when no
    # stats are asked for must leave the output bit for bit the same.
    q, k, v = qkv(1, 4, 2, 2500, 2500, 32, seed=4)
    cfg = ha.HyperAttentionConfig(seed=1, max_error=None, min_seq_len=512, chunk=1024)
    plain = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    with_stats, stats = ha.hyper_attention(q, k, v, causal=True, config=cfg, return_stats=True)
    assert torch.equal(plain, with_stats)
    assert float(stats.est_error.max()) > 0  # the trial ran when stats were asked for


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_probe_rows_for_heavy_columns_alone(causal):
    # need_out=False (no guard, no stats) scores the finding rows only: the same heavy
    # columns and the same LSE on those rows, bit for bit (the same operations on them).
    q, k, v = qkv(1, 4, 2, 1500, 1300, 32, seed=1)
    k[:, :, 700] *= 5
    plan = S.make_plan(1500, 1300, causal, 128, 128, 512, 256)
    probe = S.probe_rows(plan, 0, 1, torch.arange(4), 4, 4)
    out, lse, heavy, _ = S.probe_exact(q, k, v, 0.125, plan, probe, 16, 4, 4)
    none, lse_f, heavy_f, pairs_f = S.probe_exact(q, k, v, 0.125, plan, probe, 16, 4, 4, need_out=False)
    find = S.finders(16, 4, "cpu")
    assert none is None and out is not None
    assert torch.equal(heavy_f, heavy) and bool((heavy >= 0).any())
    assert torch.equal(lse_f[..., find], lse[..., find])
    assert bool(torch.isneginf(lse_f[..., ~find]).all()) and bool(torch.isfinite(lse[..., ~find]).any())
    assert pairs_f is None  # only the stats count scored pairs, and they imply need_out
    # Only the estimating rows' outputs are read (the error estimate): the finding rows' are 0.
    assert not bool(out[..., find, :].any()) and bool(out[..., ~find, :].any())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_heavy_span_scans_near_keys_and_carried_columns(causal):
    # heavy_span: the finding rows of chunk c score the keys [lo[c], hi[c]) and the columns
    # earlier chunks found near themselves (carried); their LSE is over both; a vertical
    # line far back is still found in the last chunk (carried from the first); the
    # estimating rows still see every key; a span covering every key is the full scan.
    q, k, v = qkv(1, 4, 2, 2300, 2300, 32, seed=2)
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0)
    q += u
    k[:, :, 60] = 30 * u  # a column far back that every row weighs
    plan = S.make_plan(2300, 2300, causal, 128, 128, 512, 256)
    probe = S.probe_rows(plan, 0, 1, torch.arange(4), 4, 4)
    full = S.probe_exact(q, k, v, 0.125, plan, probe, 8, 4, 4)
    assert all(torch.equal(a, b) for a, b in zip(full, S.probe_exact(q, k, v, 0.125, plan, probe, 8, 4, 4,
                                                                      span=None)))
    out, lse, heavy, pairs = S.probe_exact(q, k, v, 0.125, plan, probe, 8, 4, 4, span=300)
    lo, hi = S.heavy_range(plan, 300)
    last = plan.num_chunks - 1
    assert int(lo[last]) > 60 and bool((lo[0] == 0) & (hi[0] == (2300 if causal else 812)))
    assert bool((full[2][0, :, last] == 60).any()) and bool((heavy[0, :, last] == 60).any())
    find = S.finders(16, 4, "cpu")
    flat = torch.where(find, probe, -1).reshape(1, 4, -1)
    row_lo = torch.where(find, lo.unsqueeze(-1), 0).reshape(-1)
    near, mass = S._top_mass(q, k, flat, 0.125, plan, row_lo, torch.where(find, hi.unsqueeze(-1), 2300).reshape(-1),
                             torch.logsumexp(S._row_scores(q, k, flat, 0.125, plan, 0, 2300, row_lo,
                                                           torch.where(find, hi.unsqueeze(-1), 2300).reshape(-1)), -1),
                             find, 8, 4, 2, with_mass=True)
    carried = S.carried_columns(near, mass, plan, 300, S.CARRIED * 8)
    # Every heavy column of chunk c is near it or carried to it.
    for c in range(plan.num_chunks):
        for g in range(2):
            keys = heavy[0, g, c][heavy[0, g, c] >= 0]
            allowed = ((keys >= lo[c]) & (keys < hi[c])) | torch.isin(keys, carried[0, g, c])
            assert bool(allowed.all())
    # The finding rows' LSE: over their chunk's keys and its carried columns (the logits written out).
    rows = probe[0, 0, last, find]
    sc = (q[0, 0, rows] @ k[0, 0].T) * 0.125
    cols = torch.arange(2300)
    seen = ((cols >= lo[last]) & (cols < hi[last]) & ((cols <= rows.unsqueeze(-1)) if causal else True)
            | torch.isin(cols, carried[0, 0, last]))
    expect = torch.logsumexp(sc.masked_fill(~seen, float("-inf")), -1)
    assert torch.allclose(lse[0, 0, last, find], expect, atol=1e-5)
    assert torch.equal(lse[..., ~find], full[1][..., ~find]) and torch.equal(out, full[0])
    assert float(pairs) < float(full[3])  # the stats count the keys scored
    # The heavy columns: the 8 of the carried and the RESCORED * 8 heaviest near columns with
    # the most mass under that LSE (summed over the group's finding rows, from the logits
    # here); a candidate left out weighs no more than the lightest one taken.
    near_all = S._top_mass(q, k, flat, 0.125, plan, row_lo, torch.where(find, hi.unsqueeze(-1), 2300).reshape(-1),
                           torch.logsumexp(S._row_scores(q, k, flat, 0.125, plan, 0, 2300, row_lo,
                                                         torch.where(find, hi.unsqueeze(-1), 2300).reshape(-1)), -1),
                           find, S.RESCORED * 8, 4, 2)
    for c in range(1, plan.num_chunks):
        rows = probe[0, :2, c, find]  # the finding rows of KV head 0's two query heads
        sc = torch.stack([q[0, h, rows[h]] @ k[0, 0].T for h in range(2)]) * 0.125
        seen = (((cols >= lo[c]) & (cols < hi[c])) | torch.isin(cols, carried[0, 0, c])) & (
            (cols <= rows.unsqueeze(-1)) if causal else True)
        mass = torch.exp(sc.masked_fill(~seen, float("-inf")) - lse[0, :2, c, find].unsqueeze(-1)).sum((0, 1))
        cand = torch.cat([carried[0, 0, c], near_all[0, 0, c]])
        cand = cand[cand >= 0]
        picked = heavy[0, 0, c][heavy[0, 0, c] >= 0]
        assert bool(torch.isin(picked, cand).all()) and len(picked) == min(8, len(cand))
        left = cand[~torch.isin(cand, picked)]
        if len(left):
            assert float(mass[left].max()) <= float(mass[picked].min()) * (1 + 1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_span_cuts_only_where_a_chunk_misses_keys(causal):
    # The carried step runs only where some chunk's finding rows miss a key they would see.
    plan = S.make_plan(2300, 2300, causal, 128, 128, 512, 256)
    assert not S.span_cuts(plan, None) and not S.span_cuts(plan, 2300) and S.span_cuts(plan, 300)
    lo, hi = S.heavy_range(plan, 2300)
    assert bool((lo == 0).all() & (hi == 2300).all())
    # The default span (32,768) covers every key below it: the default is the full scan there.
    assert not S.span_cuts(S.make_plan(32768, 32768, causal, 128, 128, 4096, 4096), ha.HyperAttentionConfig().heavy_span)
    assert S.span_cuts(S.make_plan(65536, 65536, causal, 128, 128, 4096, 4096), ha.HyperAttentionConfig().heavy_span)


@pytest.mark.parametrize("count", [4, 40])
def test_carried_columns_are_earlier_chunks_heaviest_columns_before_the_range(count):
    # Chunk c's candidates: of the columns found by chunks before it (never after: chunk-causal)
    # and before its own range, the count with the most mass summed over those chunks,
    # ascending, each once; with room for all of them, all of them.
    plan = S.make_plan(2300, 2300, True, 128, 128, 512, 256)
    lo, _ = S.heavy_range(plan, 300)
    gen = torch.Generator().manual_seed(1)
    near = torch.stack([torch.randperm(2300, generator=gen)[:6] for _ in range(2 * plan.num_chunks)])
    near = near.view(1, 2, plan.num_chunks, 6)
    near[0, 0, :, 5] = -1  # none found there
    near[0, 1, :, 0] = 17  # a column every chunk finds
    # Distinct masses (multiples of 1/64: sums exact), so the ranking has no ties.
    mass = (torch.randperm(2 * plan.num_chunks * 6, generator=gen).float() + 1).view(near.shape) / 64
    carried = S.carried_columns(near, mass, plan, 300, count)
    assert carried.shape == (1, 2, plan.num_chunks, count)
    for c in range(plan.num_chunks):
        for g in range(2):
            got = carried[0, g, c][carried[0, g, c] >= 0]
            pool, weight = near[0, g, :c].flatten(), mass[0, g, :c].flatten()
            ok = (pool >= 0) & (pool < lo[c])
            cols = torch.unique(pool[ok])
            summed = torch.stack([weight[ok & (pool == x)].sum() for x in cols]) if len(cols) else torch.zeros(0)
            expect = cols[torch.topk(summed, min(count, len(cols))).indices].sort().values
            assert torch.equal(got, expect)
            if g == 1 and c > 0 and lo[c] > 17:
                assert 17 in got.tolist()  # found by every earlier chunk: the heaviest
    assert int((carried[0, :, 0] >= 0).sum()) == 0
    assert count == 4 or bool((carried >= 0).sum(-1).max() > 4)  # the large count is not the cap


def test_without_the_guard_chunks_costlier_than_exact_run_exact():
    # A budget that covers about every key: the chunks where it costs as much as exact
    # attention run exact (SDPA's role on CUDA), the others approximate, without a host wait.
    q, k, v = qkv(1, 4, 2, 700, 700, 16, seed=3)
    cfg = _cfg(key_blocks=3, sample_size=64, min_seq_len=32)
    out, stats = ha.hyper_attention(q, k, v, causal=True, config=cfg, return_stats=True)
    exact_chunks = stats.exact_chunks[0, 0]
    assert bool(exact_chunks.any()) and not bool(exact_chunks.all())
    ref = attention_lse(q, k, v, 0.25, True)[0]
    c = int(torch.nonzero(exact_chunks)[0])
    rows = slice(max(c * 128, 32), (c + 1) * 128)
    assert torch.allclose(out[:, :, rows], ref[:, :, rows], atol=FP32_ATOL)
    assert torch.equal(out, ha.hyper_attention(q, k, v, causal=True, config=cfg))


def test_chunk_scores_sum_each_chunks_blocks_and_heads():
    # The definition, written out: chunk c of KV head g sums the clamped scores of its query
    # blocks over the group's query heads (a ragged start and end of the block range).
    plan = S.make_plan(3000, 3000, True, 128, 128, 512, 256)
    first, count = 3, 17
    scores = torch.randn(2, 4, count, plan.nkb)
    got = S.chunk_scores(scores, first, plan, 2)
    want = torch.zeros_like(got)
    for j in range(count):
        c = (first + j) // plan.chunk_blocks
        want[:, :, c] += scores[:, :, j].clamp(min=0).reshape(2, 2, 2, -1).sum(2)
    assert torch.allclose(got, want, atol=1e-6)
