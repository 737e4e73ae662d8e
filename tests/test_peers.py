"""Peer patterns and the oracle: full budget exact, budgets counted, row subsets equal the full call."""

from __future__ import annotations

import pytest
import torch

import hyperattn as ha
from conftest import FP32_ATOL, assert_matches_exact, qkv, rel_err
from hyperattn.reference.exact import attention_lse
from hyperattn.reference.peers import RUNNERS, peer_rows

FULL = {
    "streaming": dict(window=1000),
    "vertical_slash": dict(window=1000, heavy_columns=1000),
    "block_topk": dict(key_blocks=20),
    "oracle_topk": dict(block_size=8, sample_size=1000),
}


def test_runner_names():
    assert set(RUNNERS) == {"streaming", "vertical_slash", "block_topk", "oracle_topk"}


@pytest.mark.parametrize("nq,nk", [(300, 333), (333, 300)], ids=["nq<nk", "nq>nk"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("method", sorted(FULL))
def test_full_budget_is_exact(method, causal, nq, nk):
    if method == "streaming" and not causal:
        pytest.skip("streaming keeps only keys up to the aligned position: a causal pattern")
    q, k, v = qkv(1, 4, 2, nq, nk, 16)
    cfg = ha.HyperAttentionConfig(method=method, min_seq_len=32, seed=0, **FULL[method])
    out, lse = ha.hyper_attention(q, k, v, causal=causal, config=cfg, return_lse=True)
    ref, ref_lse = attention_lse(q, k, v, 0.25, causal)
    assert torch.allclose(out, ref, atol=FP32_ATOL)


@pytest.mark.parametrize("method,changes,expected", [
    pytest.param("streaming", dict(num_sinks=4, window=60), 64, id="streaming"),
    pytest.param("oracle_topk", dict(block_size=40, sample_size=24), 64, id="oracle"),
], )
def test_keys_per_query_counts_the_pattern(method, changes, expected):
    # Rows >= min_seq_len score exactly `expected` keys; the first 256 rows are exact causal.
    q, k, v = qkv(1, 2, 2, 1024, 1024, 16)
    cfg = ha.HyperAttentionConfig(method=method, min_seq_len=256, seed=0, **changes)
    _, stats = ha.hyper_attention(q, k, v, causal=True, config=cfg, return_stats=True)
    want = (256 * 257 / 2 + expected * 768) / 1024
    assert stats.keys_per_query == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("method", sorted(FULL))
def test_row_subset_equals_full_call(method):
    q, k, v = qkv(1, 2, 1, 400, 400, 16)
    cfg = ha.HyperAttentionConfig(method=method, min_seq_len=64, seed=0, window=64, heavy_columns=8,
                                  key_blocks=2, block_size=32, sample_size=16)
    full = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    rows = torch.tensor([70, 200, 399])
    part, _, _ = peer_rows(method, q, k, v, 0.25, True, cfg, 0, rows)
    assert torch.allclose(part, full[:, :, rows], atol=FP32_ATOL)


def test_oracle_samples_reduce_error():
    q, k, v = qkv(1, 2, 2, 600, 600, 16, seed=4)
    ref = attention_lse(q, k, v, 0.25, True)[0]
    drop = ha.hyper_attention(q, k, v, causal=True, config=ha.HyperAttentionConfig(
        method="oracle_topk", block_size=32, sample_size=0, min_seq_len=64, seed=0))
    sampled = ha.hyper_attention(q, k, v, causal=True, config=ha.HyperAttentionConfig(
        method="oracle_topk", block_size=32, sample_size=128, min_seq_len=64, seed=0))
    # Random heads are diffuse: dropping the tail loses most of the mass; estimating it keeps it.
    assert rel_err(sampled, ref) < rel_err(drop, ref)


@pytest.mark.parametrize("nq,nk", [(300, 20), (20, 300), (1, 20), (64, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("method", ha.METHODS)
def test_below_min_seq_len_every_method_is_exact_with_nq_ne_nk(method, causal, nq, nk):
    # Issue 13: vertical_slash indexed its diagonals out of range for causal Nq > Nk. With
    # Nk at or below min_seq_len every method is exact; causal rows i < Nq - Nk see no key
    # (bottom-right alignment, as flash-attn) and return 0 with lse -inf.
    q, k, v = qkv(1, 4, 2, nq, nk, 16, seed=5)
    cfg = ha.HyperAttentionConfig(method=method, seed=0)  # min_seq_len default >= 1024 > Nk
    out, lse = ha.hyper_attention(q, k, v, causal=causal, config=cfg, return_lse=True)
    ref, ref_lse = attention_lse(q, k, v, 0.25, causal)
    assert_matches_exact(out, lse, ref, ref_lse)
    if causal and nq > nk:
        assert bool((out[:, :, :nq - nk] == 0).all())
        assert bool((lse[:, :, :nq - nk] == float("-inf")).all())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_vertical_slash_probe_rows_before_the_first_key(causal):
    # 512 probe rows of 700 queries on 300 keys: the first probe rows' aligned positions are
    # negative, so their diagonals lie below -(Nk - 1); they must be stored, not wrapped.
    q, k, v = qkv(1, 4, 2, 700, 300, 16, seed=6)
    cfg = ha.HyperAttentionConfig(method="vertical_slash", min_seq_len=64, seed=0, probe_rows=512, window=32,
                                  heavy_columns=8)
    out = ha.hyper_attention(q, k, v, causal=causal, config=cfg)
    assert bool(torch.isfinite(out).all())
    if causal:
        assert bool((out[:, :, :400] == 0).all())
    full = ha.hyper_attention(q, k, v, causal=causal, config=cfg.replace(window=1000, heavy_columns=300))
    assert torch.allclose(full, attention_lse(q, k, v, 0.25, causal)[0], atol=FP32_ATOL)
