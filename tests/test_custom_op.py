"""``torch.ops.hyperattn.attention``: same results as hyper_attention, one opaque node under torch.compile."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import hyperattn as ha
from conftest import FP32_ATOL, qkv, rel_err
from hyperattn.custom_op import _CONFIG_FIELDS, attention
from hyperattn.reference.exact import attention_lse

CFG = ha.HyperAttentionConfig(min_seq_len=64, seed=0)


def test_op_arguments_cover_every_config_field():
    # A config field missing here would silently take its default inside the op.
    assert set(_CONFIG_FIELDS) == {f.name for f in dataclasses.fields(ha.HyperAttentionConfig)}
    assert hasattr(torch.ops.hyperattn, "attention")


@pytest.mark.parametrize("method", ha.METHODS)
def test_op_equals_hyper_attention(method):
    q, k, v = qkv(1, 4, 2, 300, 280, 16, seed=1)
    cfg = CFG.replace(method=method, block_size=32, sample_size=32)
    out, lse = attention(q, k, v, True, None, cfg, return_lse=True)
    ref, ref_lse = ha.hyper_attention(q, k, v, True, None, cfg, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_fullgraph_compile_is_one_graph_and_does_not_recompile_per_length():
    counter = CompileCounter()
    compiled = torch.compile(attention, backend=counter, fullgraph=True)
    for n in (300, 400, 520):
        q, k, v = qkv(1, 4, 2, n, n, 16, seed=n)
        assert torch.equal(compiled(q, k, v, True, None, CFG), attention(q, k, v, True, None, CFG))
    # One compile for the first length, one to dynamic shapes at the second, none after.
    assert counter.frame_count <= 2


def test_errors_surface_at_trace_time_naming_the_argument():
    q, k, v = qkv(1, 4, 3, 64, 64, 16)
    compiled = torch.compile(attention, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="k: expected a head count Hkv"):
        compiled(q, k, v, True, None, CFG)
    with pytest.raises(ValueError, match="k: expected a head count Hkv"):
        attention(q, k, v, True, None, CFG)


def test_meta_tensors_pass_through_the_op():
    q = torch.empty(1, 4, 300, 16, device="meta")
    k = torch.empty(1, 2, 300, 16, device="meta")
    out, lse = attention(q, k, k, True, None, None, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and out.device.type == "meta"


def _grads(fn, q, k, v, cfg):
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*inputs, True, None, cfg, return_lse=True)
    # lse enters the loss too, so its gradient path is checked as well
    (out.square().sum() + lse.sum()).backward()
    return [x.grad for x in inputs]


@pytest.mark.parametrize("method", ["structured", "hyper"])
def test_gradient_equals_hyper_attention_gradient(method):
    q, k, v = qkv(1, 4, 2, 300, 300, 16, seed=2)
    cfg = CFG.replace(method=method, block_size=32, sample_size=32)
    for got, want in zip(_grads(attention, q, k, v, cfg), _grads(ha.hyper_attention, q, k, v, cfg)):
        assert torch.allclose(got, want, atol=FP32_ATOL)


def test_gradient_with_seed_none_replays_the_forward_draws():
    # Full budget: exact whatever the draws, so the gradient is exact attention's; the seed
    # the forward drew reaches backward (a mismatch would show as a different budget path).
    q, k, v = qkv(1, 4, 2, 300, 300, 16, seed=3)
    cfg = ha.HyperAttentionConfig(method="hyper", min_seq_len=64, block_size=32, sample_size=4096)

    def exact(q, k, v, causal, scale, config, return_lse):
        return attention_lse(q, k, v, 0.25, causal)

    for got, want in zip(_grads(attention, q, k, v, cfg), _grads(exact, q, k, v, cfg)):
        assert torch.allclose(got, want, atol=FP32_ATOL)


def test_compiled_backward_runs_through_aot():
    q, k, v = qkv(1, 4, 2, 300, 300, 16, seed=4)
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    for got, want in zip(_grads(compiled, q, k, v, CFG), _grads(attention, q, k, v, CFG)):
        assert torch.allclose(got, want, atol=FP32_ATOL)


@pytest.mark.parametrize("need_lse", [True, False], ids=["lse", "no-lse"])
def test_opcheck(need_lse):
    q, k, v = qkv(1, 2, 1, 100, 100, 16, seed=5)
    q.requires_grad_()
    args = (q, k, v, True, None, *(getattr(CFG, name) for name in _CONFIG_FIELDS), need_lse)
    torch.library.opcheck(torch.ops.hyperattn.attention.default, args)


def test_the_op_asks_for_an_lse_only_when_its_caller_does(monkeypatch):
    # An LSE sends the structured default below its crossover to its own exact path, where
    # without one it is a single SDPA call on CUDA; transformers' integration asks for none
    # (with one, an 8B prefill at 131k took minutes against SDPA's 12 s).
    import hyperattn.custom_op as op

    seen = []
    real = op.hyper_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("return_lse", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "hyper_attention", spy)
    q, k, v = qkv(1, 2, 1, 300, 300, 16, seed=6)
    q.requires_grad_()
    attention(q, k, v, True, None, CFG).sum().backward()
    assert seen == [False, False]  # the forward and the backward's recompute
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())
    seen.clear()
    out, lse = attention(q, k, v, True, None, CFG, return_lse=True)
    assert seen == [True] and lse.shape == (1, 2, 300)


def test_largest_seed_crosses_the_op_boundary():
    # The op's seed argument is an int64: the whole accepted range [0, 2**63 - 1] must pass.
    q, k, v = qkv(1, 2, 1, 300, 300, 16, seed=6)
    cfg = CFG.replace(seed=2**63 - 1)
    assert torch.equal(attention(q, k, v, True, None, cfg), ha.hyper_attention(q, k, v, True, None, cfg))
    for method in ("structured", "hyper"):
        q.requires_grad_()
        attention(q, k, v, True, None, cfg.replace(method=method)).sum().backward()
        assert bool(torch.isfinite(q.grad).all())
        q = q.detach()


@pytest.mark.parametrize("loss_of", ["out", "lse"])
def test_gradient_when_the_loss_uses_one_output(loss_of):
    q, k, v = qkv(1, 2, 1, 200, 200, 16, seed=7)
    grads = []
    for fn in (attention, ha.hyper_attention):
        leaf = q.clone().requires_grad_()
        out, lse = fn(leaf, k, v, True, None, CFG, return_lse=True)
        (out if loss_of == "out" else lse).sum().backward()
        grads.append(leaf.grad)
    assert torch.allclose(grads[0], grads[1], atol=FP32_ATOL)


def _count_calls(monkeypatch):
    import hyperattn.custom_op as op

    calls = []
    real = op.hyper_attention

    def spy(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "hyper_attention", spy)
    return calls


def test_eager_training_off_cuda_goes_through_the_op(monkeypatch):
    # Off CUDA the methods' autograd (the references) keeps the scores for backward: the op's
    # recompute-in-backward keeps memory at the inputs', so the forward runs twice, the
    # second time under grad.
    calls = _count_calls(monkeypatch)
    q, k, v = qkv(1, 2, 1, 300, 300, 16, seed=7)
    q.requires_grad_()
    attention(q, k, v, True, None, CFG).sum().backward()
    assert calls == [False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["structured", "hyper"])
def test_eager_training_on_cuda_runs_the_forward_once(method, monkeypatch):
    # With Triton backward kernels (O(N) kept for backward) the wrapper calls the method
    # itself outside torch.compile: one forward per step, and the gradient of the same call.
    calls = _count_calls(monkeypatch)
    q, k, v = qkv(1, 4, 2, 2048, 2048, 64, device="cuda", seed=8)
    cfg = ha.HyperAttentionConfig(method=method, seed=0, max_error=None, min_seq_len=256, chunk=512)
    got = _grads(attention, q, k, v, cfg)
    assert calls == [True]
    for mine, want in zip(got, _grads(ha.hyper_attention, q, k, v, cfg)):
        # The same call on the same draws: equal up to the order of the dk/dv atomic adds.
        assert rel_err(mine, want) < 1e-5
