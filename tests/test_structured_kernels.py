"""The structured method's Triton kernel against its PyTorch reference, on the same selection and draws.

Everything here needs CUDA; the selection code is the reference's own, so the kernel is
checked on exactly the index lists the reference attends.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import exact_low_precision, qkv, rel_err

import hyperattn as ha
from hyperattn.reference import structured as ref
from hyperattn.reference.exact import attention_lse

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# fp32 kernel vs fp32 reference: the same terms in another order and base-2 exponentials;
# ~3e-7 relative measured for the hyper kernels, 1e-5 leaves room.
FP32_RTOL = 1e-5
# Low precision: the kernel multiplies bf16/fp16 operands (fp32 accumulation) and rounds
# the softmax weights to the input dtype before P @ V, as flash kernels do; the error
# against the fp32 reference may be at most twice that of exact attention rounded the same way.
LOWP_FACTOR = 2.0

# (B, Hq, Hkv, Nq, Nk, D, lsh_block)
CASES = [
    (1, 4, 2, 1500, 1500, 64, 32),
    (2, 2, 1, 700, 900, 128, 32),
    (1, 4, 4, 900, 700, 64, 0),
    (1, 8, 2, 2100, 2100, 128, 16),
]
IDS = ["gqa", "nq<nk-d128", "nq>nk-nolsh", "lsh16"]


def _budget(lsh, **kw):
    return ref.Budget(min_seq_len=256, lsh_block=lsh, sample_size=128, key_blocks=3, window=64, heavy_columns=16,
                      num_sinks=4, probe_rows=32, **kw)


def _selection(q, k, v, causal, budget, seed=5):
    nq, nk = q.shape[2], k.shape[2]
    r0 = ref.first_approx_row(nq, nk, causal, budget.min_seq_len)
    nb = math.ceil((nq - r0) / budget.query_block)
    draws = ref.draw_structured(seed, q.shape[-1], q.shape[0], q.shape[1], nb, budget, q.device)
    scale = q.shape[-1] ** -0.5
    heavy, _ = ref.heavy_columns(q, k, scale, causal, budget, draws, r0)
    sorted_comp, k_order = ref.sort_keys_by_bucket(k, draws.proj)
    lsh = (sorted_comp.repeat_interleave(q.shape[1] // k.shape[1], 1), k_order) if budget.lsh_block else None
    blocks = torch.arange(nb)
    sel, _ = ref.select_blocks(q, k, scale, causal, budget, draws, r0, blocks, heavy,
                               ref.pool_keys(k.float(), budget.key_block), lsh)
    return sel, r0


class _ReferenceWithKernelScores:
    """The PyTorch attention step with the kernels' block scores.

    Block scores rank key blocks; on random inputs they are nearly tied (pooled queries and
    keys are almost orthogonal), so the kernel's ~1e-7 differences from the PyTorch scores
    can reorder a query block's 4th and 5th key block. The block-score kernel is checked on
    its own (test_block_score_kernel_matches_reference); here both paths share it, so they
    select the same keys and only the attention arithmetic is compared.
    """

    def __init__(self):
        from hyperattn.kernels.structured import block_scores

        self.block_scores = block_scores

    def __call__(self, *args):
        return ref.attend_blocks(*args)


def _reference_path(q, k, v, causal, cfg):
    out, lse, stats, _ = ref.structured_run(q.float(), k.float(), v.float(), q.shape[-1] ** -0.5, causal,
                                            ref.budget_from_config(cfg), cfg.seed, cfg.max_error, ha.AttentionStats,
                                            attend=_ReferenceWithKernelScores())
    return out, lse, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_reference_on_the_same_selection(case, causal, dtype):
    from hyperattn.kernels.structured import structured_block_attention

    bsz, hq, hkv, nq, nk, dim, lsh = case
    q, k, v = qkv(bsz, hq, hkv, nq, nk, dim, dtype=dtype, device="cuda", seed=nq + dim)
    k[:, :, 3] *= 3.0  # a heavy column
    budget = _budget(lsh)
    sel, r0 = _selection(q, k, v, causal, budget)
    scale = dim ** -0.5
    want_out, want_lse = ref.attend_blocks(q.float(), k.float(), v.float(), scale, causal, r0, budget.query_block,
                                           sel)
    got_out, got_lse = structured_block_attention(q, k, v, scale, causal, r0, budget.query_block, sel)
    rows = (r0 + budget.query_block * sel.blocks.cuda()[:, None] + torch.arange(budget.query_block,
                                                                               device="cuda")).flatten()
    keep = rows < nq
    want_out = want_out.flatten(2, 3)[:, :, keep]
    got_out = got_out.flatten(2, 3)[:, :, keep]
    want_lse, got_lse = want_lse.flatten(2)[:, :, keep], got_lse.flatten(2)[:, :, keep]
    assert torch.isfinite(got_out).all() and torch.isfinite(got_lse).all()
    if dtype == torch.float32:
        assert rel_err(got_out, want_out) < FP32_RTOL
        assert rel_err(got_lse, want_lse) < FP32_RTOL
    else:
        exact, _ = attention_lse(q, k, v, scale, causal)
        baseline = rel_err(exact_low_precision(q, k, v, causal), exact)
        assert rel_err(got_out, want_out) <= LOWP_FACTOR * baseline
        assert rel_err(got_lse, want_lse) < 1e-3  # logits from the same bf16/fp16 products, fp32 sums


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_public_call_matches_the_reference_path_on_the_gpu(causal):
    # Same device, same draws: the public call (kernels) and the PyTorch path differ by rounding only.
    q, k, v = qkv(1, 8, 2, 3000, 3000, 64, device="cuda", seed=17)
    k[:, :, 0] *= 4.0
    cfg = ha.HyperAttentionConfig(min_seq_len=512, seed=4)
    out, lse, stats = ha.hyper_attention(q, k, v, causal=causal, config=cfg, return_lse=True, return_stats=True)
    want, want_lse, want_stats = _reference_path(q, k, v, causal, cfg)
    assert rel_err(out, want) < FP32_RTOL
    assert rel_err(lse, want_lse) < FP32_RTOL
    assert stats.keys_per_query == pytest.approx(want_stats.keys_per_query, rel=1e-9)
    assert torch.equal(stats.exact_heads, want_stats.exact_heads)
    assert torch.allclose(stats.est_error, want_stats.est_error, rtol=1e-3, atol=1e-6)
    assert stats.keys_per_query > 0


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_full_budget_is_exact(causal):
    q, k, v = qkv(1, 4, 2, 1800, 1800, 64, device="cuda", seed=19)
    cfg = ha.HyperAttentionConfig(min_seq_len=256, sample_size=10**6, max_error=None, seed=1)
    out, lse = ha.hyper_attention(q, k, v, causal=causal, config=cfg, return_lse=True)
    exact_out, exact_lse = attention_lse(q, k, v, 64 ** -0.5, causal)
    assert rel_err(out, exact_out) < FP32_RTOL
    assert rel_err(lse, exact_lse) < FP32_RTOL


def test_gqa_equals_repeated_kv():
    q, k, v = qkv(1, 8, 2, 2000, 2000, 64, device="cuda", seed=23)
    cfg = ha.HyperAttentionConfig(min_seq_len=256, seed=2)
    out = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    rep = ha.hyper_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), causal=True, config=cfg)
    assert rel_err(out, rep) < FP32_RTOL


def test_rows_read_only_visible_values():
    # Which keys a row scores may depend on later tokens (module docstring); the values it reads may not.
    n, cut = 2500, 1700
    q, k, v = qkv(1, 4, 2, n, n, 64, device="cuda", seed=29)
    cfg = ha.HyperAttentionConfig(min_seq_len=256, seed=6)
    out = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    v2 = v.clone()
    v2[:, :, cut:] = torch.randn_like(v2[:, :, cut:]) * 100
    out2 = ha.hyper_attention(q, k, v2, causal=True, config=cfg)
    assert torch.equal(out[:, :, :cut], out2[:, :, :cut])
    assert not torch.equal(out[:, :, cut:], out2[:, :, cut:])


def test_default_long_bf16_call_runs_the_kernel_and_reports_its_error():
    n = 16384
    q, k, v = qkv(1, 8, 2, n, n, 128, dtype=torch.bfloat16, device="cuda", seed=31)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = ha.hyper_attention(q, k, v, causal=True, config=ha.HyperAttentionConfig(seed=3),
                                        return_stats=True)
    assert not [w for w in caught if "hyper_attention" in str(w.message)]  # no fallback: the kernel path ran
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert stats.method == "structured" and stats.est_error.shape == (1, 8)
    assert stats.keys_per_query > 0
    # Without the guard (whose tier choice may flip on rounding at the threshold) the call
    # is the reference's function up to low-precision rounding.
    cfg = ha.HyperAttentionConfig(seed=3, max_error=None)
    out = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    want, _, _ = _reference_path(q, k, v, True, cfg)
    exact, _ = attention_lse(q[:, :, -1024:], k, v, 128 ** -0.5, True)
    baseline = rel_err(exact_low_precision(q[:, :, -1024:], k, v, True), exact)
    assert rel_err(out[:, :, -1024:], want[:, :, -1024:]) <= LOWP_FACTOR * baseline


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("nq,nk", [(3000, 3000), (1200, 2000), (2000, 1200)], ids=lambda x: str(x))
def test_block_score_kernel_matches_reference(nq, nk, causal):
    from hyperattn.kernels.structured import block_scores

    q, k, _ = qkv(1, 8, 2, nq, nk, 128, dtype=torch.bfloat16, device="cuda", seed=nq)
    budget = ref.Budget(min_seq_len=256)
    r0 = ref.first_approx_row(nq, nk, causal, budget.min_seq_len)
    blocks = torch.arange(math.ceil((nq - r0) / budget.query_block))
    k_pool = ref.pool_keys(k.float(), budget.key_block)
    want, want_pairs = ref.block_scores(q, k_pool, nk, 128 ** -0.5, causal, r0, blocks, budget)
    got, got_pairs = block_scores(q, k_pool, nk, 128 ** -0.5, causal, r0, blocks, budget)
    # Softmax weights summed over 8 groups (values in [0, 8]); tf32x3 products carry ~fp32 accuracy.
    assert (got - want).abs().max() < 1e-5
    assert float(got_pairs) == float(want_pairs)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("nq,nk", [(1500, 1500), (700, 1100), (1100, 700)], ids=lambda x: str(x))
def test_exact_method_on_cuda_runs_the_range_kernel(nq, nk, causal):
    q, k, v = qkv(1, 8, 2, nq, nk, 64, device="cuda", seed=nq + 1)
    out, lse = ha.hyper_attention(q, k, v, causal=causal, config=ha.HyperAttentionConfig(method="exact"),
                                  return_lse=True)
    want, want_lse = attention_lse(q, k, v, 64 ** -0.5, causal)
    visible = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), visible)
    assert rel_err(out, want) < FP32_RTOL
    assert rel_err(lse[visible], want_lse[visible]) < FP32_RTOL
