"""Gradients of the public call: ``torch.autograd.gradcheck`` in float64 on ``hyper_attention`` itself.

For a fixed seed every method is a fixed function of q, k, v (hashes, selections and
samples drawn from the seed; their log-weights are constants), smooth away from the
measure-zero inputs where a hash or a ranking flips. gradcheck compares autograd with
central finite differences of that function (``fast_mode``: one random direction per
input and output, which keeps the file within its time budget; a wrong gradient in any
entry shows in a random projection with probability 1).

The structured method's residual proposal follows block scores of q and k, so with the
default ``sample_mix`` its log-weights move with the inputs while the backward holds them
constant (they are part of the selection); the gradcheck cases use ``sample_mix=1.0``
(uniform proposal, constant weights), and :func:`test_default_proposal_gradient_holds_the_weights`
checks the default proposal with its weights frozen.
"""

from __future__ import annotations

import pytest
import torch
from conftest import qkv, rel_err

import hyperattn as ha
from hyperattn.reference import selection as sel_ref

# gradcheck's defaults are for float64 functions computed in float64 throughout: our float64
# path is (compute_dtype), so the finite differences agree to ~1e-9 and these bounds only
# leave room for the differences' own truncation error (eps=1e-6, second-order ~1e-12 / eps).
GRADCHECK = dict(eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)

# The structured method at toy sizes: blocks of 16 rows, chunks of 32, so N ~ 100 has every
# part (window, top blocks, sinks, heavy columns, samples, LSH blocks) and several chunks.
STRUCTURED = ha.HyperAttentionConfig(seed=0, min_seq_len=16, query_block=16, chunk=32, window=16, key_blocks=1,
                                     score_group=4, probe_rows=4, probe_blocks=2, sample_size=8, heavy_columns=2,
                                     num_sinks=2, lsh_block=4, sample_mix=1.0, max_error=None)
HYPER = ha.HyperAttentionConfig(method="hyper", seed=0, min_seq_len=16, block_size=8, sample_size=8, lsh_num_projs=3)
PEERS = {name: STRUCTURED.replace(method=name, block_size=8)
         for name in ("streaming", "vertical_slash", "block_topk", "oracle_topk")}
CONFIGS = {"structured": STRUCTURED, "hyper": HYPER, "exact": HYPER.replace(method="exact"), **PEERS}

# (Nq, Nk): lengths that are no multiple of any block (padding), Nq < Nk, and Nq > Nk
# (causal: the first 40 rows see no key, lse -inf).
SHAPES = [(70, 70), (50, 90), (90, 50)]


def _inputs(nq, nk, hq=4, hkv=2, dim=8, seed=0):
    return tuple(t.double().requires_grad_() for t in qkv(1, hq, hkv, nq, nk, dim, seed=seed))


def _call(config, causal):
    def fn(q, k, v):
        out, lse = ha.hyper_attention(q, k, v, causal=causal, config=config, return_lse=True)
        # Rows that see no key have lse -inf by contract; finite differences of -inf are NaN.
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    return fn


@pytest.mark.parametrize("nq,nk", SHAPES, ids=[f"nq{a}-nk{b}" for a, b in SHAPES])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_gradcheck_every_method(method, causal, nq, nk):
    inputs = _inputs(nq, nk)
    config = CONFIGS[method]
    _, stats = ha.hyper_attention(*inputs, causal=causal, config=config, return_stats=True)
    if method == "structured" and nk > 50:
        # The approximate path really runs (with 50 keys it costs more than exact attention,
        # so the method is exact there by design).
        assert not bool(stats.exact_heads.all())
    assert torch.autograd.gradcheck(_call(config, causal), inputs, **GRADCHECK)


# max_error per outcome on the inputs of _inputs(96, 96) (found by a sweep; the test asserts
# the outcome from stats, so a change of the guard shows as a failure here, not a silent skip).
GUARD = {
    ("approximate", True): 100.0, ("approximate", False): 100.0,
    ("exact", True): 0.02, ("exact", False): 0.02,
    ("mixed", True): 1.0, ("mixed", False): 0.5,
}


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("outcome", ["approximate", "exact", "mixed"])
def test_gradcheck_every_guard_outcome(outcome, causal):
    inputs = _inputs(96, 96)
    config = STRUCTURED.replace(max_error=GUARD[outcome, causal])
    _, stats = ha.hyper_attention(*inputs, causal=causal, config=config, return_stats=True)
    per_head = stats.exact_chunks.sum(-1)  # (B, Hq): chunks sent to exact attention
    chunks = stats.exact_chunks.shape[-1]
    if outcome == "approximate":
        # Every chunk approximate, except the causal first chunk: its rows see at most 32
        # keys, which exact attention scores more cheaply.
        assert not bool(stats.exact_chunks[..., 1:].any()) and not bool(stats.exact_heads.any())
    elif outcome == "exact":
        assert bool(stats.exact_heads.all())
    else:  # one head with both exact and approximate chunks
        assert bool(((per_head > 0) & (per_head < chunks)).any())
    assert torch.autograd.gradcheck(_call(config, causal), inputs, **GRADCHECK)


def test_gradcheck_gqa_batch_and_mqa():
    # Two batches, 6 query heads on 3 KV heads, and MQA: gradients of a shared KV head sum
    # over its query heads (gradcheck perturbs the shared k/v entries, so a missing sum fails).
    for hq, hkv in ((6, 3), (4, 1)):
        q, k, v = (t.double().requires_grad_() for t in qkv(2, hq, hkv, 48, 48, 4, seed=5))
        for config in (STRUCTURED, HYPER):
            assert torch.autograd.gradcheck(_call(config, True), (q, k, v), **GRADCHECK)


def test_default_proposal_gradient_holds_the_weights(monkeypatch):
    # With the default sample_mix the log-weights follow block scores of q and k. Freeze the
    # gathered columns of the first call (indices and weights) and replay them: the function
    # is then the approximate function of a fixed selection, whose gradient autograd must give.
    config = STRUCTURED.replace(sample_mix=STRUCTURED.__class__().sample_mix)
    inputs = _inputs(96, 96)
    recorded: list = []
    original = sel_ref.gather_columns

    def frozen(*args, **kwargs):
        if len(recorded) < frozen.calls + 1:
            idx, logw = original(*args, **kwargs)
            recorded.append((idx.detach(), logw.detach()))
        result = recorded[frozen.calls % len(recorded)]
        frozen.calls += 1
        return result

    frozen.calls = 0
    monkeypatch.setattr(sel_ref, "gather_columns", frozen)
    fn = _call(config, True)

    def replaying(q, k, v):
        frozen.calls = 0  # every call replays the same sequence of gathered columns
        return fn(q, k, v)

    replaying(*inputs)
    per_call = len(recorded)
    # The weights really vary (a non-uniform proposal), so freezing them is what is tested.
    weights = torch.cat([w[torch.isfinite(w) & (w != 0)].flatten() for _, w in recorded])
    assert weights.numel() > 0 and float(weights.max() - weights.min()) > 1e-3
    assert torch.autograd.gradcheck(replaying, inputs, **GRADCHECK)
    assert len(recorded) == per_call  # every later call replayed, none drew anew


# Gradients of the low-precision paths against the float64 gradient of the same function
# (same seed). fp32: the same sums rounded to fp32 (~1e-6 relative; 1e-4 allows for the
# LSE merges). bf16 / fp16: inputs rounded to 8 / 11 mantissa bits move the gradient by
# ~2^-8 / 2^-11 relative and the fp32 computation adds nothing beyond that; 3e-2 / 5e-3 are
# about 8x those.
LOWP_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", list(LOWP_TOL), ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["structured", "hyper"])
def test_low_precision_gradients_match_float64(method, dtype):
    config = CONFIGS[method]
    base = qkv(1, 4, 2, 90, 50, 8, seed=7)  # causal Nq > Nk: rows with no key
    grads = {}
    for dt in (torch.float64, dtype):
        # Both runs see the same (rounded) values, so they compute the same function.
        inputs = [t.to(dtype).to(dt).requires_grad_() for t in base]
        out = ha.hyper_attention(*inputs, causal=True, config=config)
        (out.float() * torch.linspace(-1, 1, 8)).sum().backward()
        grads[dt] = [t.grad for t in inputs]
    for g, ref in zip(grads[dtype], grads[torch.float64]):
        assert g.dtype == dtype and bool(torch.isfinite(g).all())
        assert rel_err(g, ref) < LOWP_TOL[dtype]


@pytest.mark.parametrize("method", ["structured", "hyper", "exact", "streaming", "oracle_topk"])
def test_no_nan_gradient_where_forward_is_finite(method):
    # Causal with Nq > Nk (rows with no key), empty LSH blocks and parts fully masked: the
    # forward is finite everywhere, so must the gradient be, from out and from lse.
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 2, 160, 100, 8, seed=3))
    config = CONFIGS[method].replace(sample_mix=0.3) if method == "structured" else CONFIGS[method]
    out, lse = ha.hyper_attention(q, k, v, causal=True, config=config, return_lse=True)
    assert bool(torch.isfinite(out).all())
    finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
    (out.square().sum() + finite_lse.sum()).backward()
    for t in (q, k, v):
        assert bool(torch.isfinite(t.grad).all()) and float(t.grad.abs().sum()) > 0
