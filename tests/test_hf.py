"""The transformers integration: attn_implementation="hyper" against "sdpa" on the same weights.

Fast tests use a tiny random Llama (GQA: 4 query heads, 2 KV heads); tests marked
``model`` load the embedded SmolLM2 once per module and keep inputs short.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from hyperattn import HyperAttentionConfig  # noqa: E402
from hyperattn.integrations import hf  # noqa: E402

# Configurations whose result equals exact attention: "exact" itself, and the paper's
# method with every column sampled (sample_size >= N) and a recursion down to 8 keys, so
# that the block, sample and merge code all run. min_query_len=1 sends every call,
# decode steps included, through the hyper path.
EXACT = HyperAttentionConfig(method="exact")
FULL_HYPER = HyperAttentionConfig(method="hyper", min_seq_len=8, block_size=16, sample_size=4096, seed=0)
FULL_BUDGETS = {"exact": EXACT, "hyper-full-budget": FULL_HYPER}
# The same on the embedded model, with fewer recursion levels to keep the 30 layers fast.
MODEL_BUDGETS = {"exact": EXACT, "hyper-full-budget": FULL_HYPER.replace(min_seq_len=32)}

# Tiny model, fp32: hyper and sdpa sum the same fp32 terms in a different order through
# 8 layers of O(1) activations; observed differences are ~3e-7, 1e-5 leaves room for
# the log-sum-exp merges of the recursion.
TINY_ATOL = 1e-5
# Embedded model, fp32, 30 layers, logits of magnitude ~20: observed differences ~2e-5
# for method="exact"; 2e-4 is still 1000x below the gap between top tokens that would
# change a greedy choice in these tests.
MODEL_ATOL = 2e-4


def _tiny_model(num_layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture
def tiny():
    model = _tiny_model()
    yield model
    hf.disable(model)


def _ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _padding(batch_lengths: list[int], n: int, side: str) -> torch.Tensor:
    mask = torch.zeros(len(batch_lengths), n, dtype=torch.long)
    for b, length in enumerate(batch_lengths):
        if side == "left":
            mask[b, n - length:] = 1
        else:
            mask[b, :length] = 1
    return mask


@torch.no_grad()
def _logits(model, ids, policy=None, **kwargs):
    if policy is None:
        hf.disable(model)
    else:
        hf.enable(model, policy)
    return model(ids, **kwargs).logits


class _Spy:
    """Records the (Nq, Nk, Hkv, seed) and the config of every attention call the integration makes."""

    def __init__(self):
        self.calls = []
        self.configs = []

    def __call__(self, q, k, v, causal=False, scale=None, config=None):
        self.calls.append((q.shape[2], k.shape[2], k.shape[1], config.seed))
        self.configs.append(config)
        from hyperattn.custom_op import attention

        return attention(q, k, v, causal=causal, scale=scale, config=config)


@pytest.fixture
def spy(monkeypatch):
    recorder = _Spy()
    monkeypatch.setattr(hf, "attention", recorder)
    return recorder


# ---------------------------------------------------------------------------------------
# registration, policy


def test_register_is_idempotent_and_registers_mask_function():
    hf.register()
    hf.register()
    assert AttentionInterface._global_mapping["hyper"] is hf.hyper_attention_forward
    assert AttentionMaskInterface._global_mapping["hyper"] is AttentionMaskInterface._global_mapping["sdpa"]


def test_from_config_accepts_hyper():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="hyper")
    assert model.config._attn_implementation == "hyper"


def test_enable_disable_switch_implementation(tiny):
    assert hf.enable(tiny) is tiny
    assert tiny.config._attn_implementation == "hyper"
    assert hf.disable(tiny).config._attn_implementation == "sdpa"
    assert not any("_hyperattn_policy" in vars(m) for m in tiny.modules())


def test_policy_config_for_layers_and_overrides():
    special = HyperAttentionConfig(method="hyper")
    policy = hf.HyperPolicy(config=EXACT, layers=[1, 2], layer_configs={2: special})
    assert policy.config_for(0) is None
    assert policy.config_for(1) is EXACT
    assert policy.config_for(2) is special
    assert hf.HyperPolicy().config_for(None) == HyperAttentionConfig()


def test_policy_negative_layers_resolve_from_the_end():
    policy = hf.HyperPolicy(layers=range(-2, 0), layer_configs={-1: EXACT}).resolve(30)
    assert policy.layers == (28, 29)
    assert policy.config_for(29) is EXACT


@pytest.mark.parametrize("kwargs,error", [
    ({"config": "structured"}, TypeError),
    ({"layers": "0,1"}, TypeError),
    ({"layers": [0.5]}, TypeError),
    ({"layers": [1, 1]}, ValueError),
    ({"layer_configs": {3: EXACT}, "layers": [1]}, ValueError),
    ({"layer_configs": {1: "exact"}}, TypeError),
    ({"min_query_len": 0}, ValueError),
    ({"min_query_len": True}, TypeError),
], ids=["config-str", "layers-str", "layers-float", "layers-repeated", "override-uncovered", "override-str",
        "min-query-0", "min-query-bool"])
def test_policy_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        hf.HyperPolicy(**kwargs)


def test_enable_rejects_layer_out_of_range_and_non_models(tiny):
    with pytest.raises(ValueError, match="out of range"):
        hf.enable(tiny, hf.HyperPolicy(layers=[3]))
    with pytest.raises(TypeError, match="model"):
        hf.enable(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="policy"):
        hf.enable(tiny, {"layers": [0]})


# ---------------------------------------------------------------------------------------
# equality with sdpa on the tiny model


@pytest.mark.parametrize("budget", list(FULL_BUDGETS), ids=list(FULL_BUDGETS))
@pytest.mark.parametrize("n", [40, 97], ids=["n40", "n97"])
def test_logits_equal_sdpa_without_mask(tiny, budget, n):
    ids = _ids(2, n)
    ref = _logits(tiny, ids)
    out = _logits(tiny, ids, hf.HyperPolicy(config=FULL_BUDGETS[budget], min_query_len=1))
    torch.testing.assert_close(out, ref, atol=TINY_ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("budget", list(FULL_BUDGETS), ids=list(FULL_BUDGETS))
def test_padding_is_exact_on_real_tokens(tiny, budget, side):
    n, lengths = 50, [50, 31, 3]
    ids, mask = _ids(3, n), _padding(lengths, n, side)
    ref = _logits(tiny, ids, attention_mask=mask)
    out = _logits(tiny, ids, hf.HyperPolicy(config=FULL_BUDGETS[budget], min_query_len=1), attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=TINY_ATOL, rtol=0)


def test_padding_rows_are_zero_and_sequences_independent(spy):
    module = torch.nn.Module()
    module._hyperattn_policy = hf.HyperPolicy(config=EXACT, min_query_len=1)
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    mask = causal.expand(2, 1, 6, 6).clone()
    mask[1, :, :, :2] = False  # sequence 1 is left-padded by 2 tokens
    out, _ = hf.hyper_attention_forward(module, q, k, v, mask, is_causal=True)
    assert out.shape == (2, 6, 4, 8)
    assert torch.equal(out[1, :2], torch.zeros(2, 4, 8))
    assert sorted(spy.calls) == [(4, 4, 2, None), (6, 6, 2, None)]


def test_float_mask_equals_bool_mask():
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    bool_mask = torch.ones(12, 12, dtype=torch.bool).tril().expand(1, 1, 12, 12).clone()
    bool_mask[..., :3] = False
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module._hyperattn_policy = hf.HyperPolicy(config=EXACT, min_query_len=1)
    a, _ = hf.hyper_attention_forward(module, q, k, v, bool_mask)
    b, _ = hf.hyper_attention_forward(module, q, k, v, float_mask)
    assert torch.equal(a, b)


def test_continuation_over_kv_cache_equals_sdpa(tiny):
    ids = _ids(1, 70)
    policy = hf.HyperPolicy(config=FULL_HYPER, min_query_len=1)
    results = []
    for use_policy in (None, policy):
        if use_policy is None:
            hf.disable(tiny)
        else:
            hf.enable(tiny, use_policy)
        cache = DynamicCache(config=tiny.config)
        with torch.no_grad():
            tiny(ids[:, :40], cache=cache, use_cache=True)
            results.append(tiny(ids[:, 40:], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(results[1], results[0], atol=TINY_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------
# policy layers, decode steps, GQA


def test_only_policy_layers_run_hyper_with_their_configs(tiny, spy):
    configs = {layer: FULL_HYPER.replace(seed=10 + layer) for layer in (0, 2)}
    out = _logits(tiny, _ids(1, 30), hf.HyperPolicy(layers=[0, 2], layer_configs=configs, min_query_len=1))
    ref = _logits(tiny, _ids(1, 30))
    assert [call[3] for call in spy.calls] == [10, 12]
    torch.testing.assert_close(out, ref, atol=TINY_ATOL, rtol=0)


def test_gqa_keys_are_not_repeated(tiny, spy):
    _logits(tiny, _ids(1, 20), hf.HyperPolicy(config=EXACT, min_query_len=1))
    assert {call[2] for call in spy.calls} == {tiny.config.num_key_value_heads}


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_generate_matches_sdpa_and_decode_steps_are_exact(tiny, spy, padded):
    ids = _ids(2, 24)
    mask = _padding([24, 17], 24, "left") if padded else torch.ones_like(ids)
    hf.disable(tiny)
    ref = tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    hf.enable(tiny, hf.HyperPolicy(config=FULL_HYPER, min_query_len=2))
    out = tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    # only the prefill went through hyper (one call per layer and distinct padding); the
    # 5 decode steps, whose Nk exceeds the prompt's 24, ran SDPA
    assert max(call[1] for call in spy.calls) <= 24
    assert len(spy.calls) == tiny.config.num_hidden_layers * (2 if padded else 1)


def test_decode_steps_through_hyper_equal_sdpa(tiny, spy):
    ids = _ids(1, 24)
    hf.disable(tiny)
    ref = tiny.generate(ids, max_new_tokens=4, do_sample=False)
    hf.enable(tiny, hf.HyperPolicy(config=FULL_HYPER, min_query_len=1))
    out = tiny.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert {call[0] for call in spy.calls} == {24, 1}


def test_left_padded_decode_steps_through_hyper_equal_sdpa(tiny, spy):
    # Issue 13: a one-token decode step with a padding mask was taken as non-causal and its
    # mask refused ("takes masks only for causal attention").
    ids = _ids(2, 24)
    mask = _padding([24, 17], 24, "left")
    hf.disable(tiny)
    ref = tiny.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    hf.enable(tiny, hf.HyperPolicy(config=FULL_HYPER, min_query_len=1))
    out = tiny.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert 1 in {call[0] for call in spy.calls}  # the decode steps went through hyper
    # the padded sequence's decode steps saw its 17 + t real keys only
    assert {(call[0], call[1]) for call in spy.calls} >= {(1, 17 + 1), (1, 24 + 1)}


def test_static_cache_prefill_equals_sdpa(tiny):
    ids = _ids(1, 20)
    hf.disable(tiny)
    ref = tiny.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    hf.enable(tiny, hf.HyperPolicy(config=FULL_HYPER, min_query_len=2))
    out = tiny.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)


def test_short_queries_run_sdpa(tiny, spy):
    _logits(tiny, _ids(1, 30), hf.HyperPolicy(config=FULL_HYPER, min_query_len=31))
    assert spy.calls == []


# ---------------------------------------------------------------------------------------
# refused inputs


def test_output_attentions_is_refused(tiny):
    hf.enable(tiny)
    with pytest.raises(ValueError, match="output_attentions"):
        with torch.no_grad():
            tiny(_ids(1, 10), output_attentions=True)


def test_dropout_in_training_is_refused():
    model = _tiny_model(num_layers=1)
    model.model.layers[0].self_attn.attention_dropout = 0.1
    hf.enable(model, hf.HyperPolicy(config=EXACT, min_query_len=1))
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(_ids(1, 10))


def _packed_mask(n: int) -> torch.Tensor:
    half = n // 2
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[half:, :half] = False
    return mask.expand(1, 1, n, n)


def _sliding_mask(n: int) -> torch.Tensor:
    i = torch.arange(n)
    return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4)).expand(1, 1, n, n)


def _bidirectional_mask(n: int) -> torch.Tensor:
    return torch.ones(1, 1, n, n, dtype=torch.bool)


def _bias_mask(n: int) -> torch.Tensor:
    return torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e9) - 0.5


def _wrong_shape_mask(n: int) -> torch.Tensor:
    return torch.ones(1, 1, n, n + 1, dtype=torch.bool).tril()


@pytest.mark.parametrize("make_mask,match", [
    (_packed_mask, "packed"),
    (_sliding_mask, "sliding"),
    (_bidirectional_mask, "causal masks"),
    (_bias_mask, "bias"),
    (_wrong_shape_mask, "4-D mask"),
], ids=["packed", "sliding-window", "bidirectional", "float-bias", "wrong-shape"])
def test_unsupported_masks_are_refused(make_mask, match):
    q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    module = torch.nn.Module()
    module._hyperattn_policy = hf.HyperPolicy(config=EXACT, min_query_len=1)
    with pytest.raises(ValueError, match=match):
        hf.hyper_attention_forward(module, q, k, k, make_mask(12), is_causal=True)


def test_packed_sequences_in_a_model_are_refused(tiny):
    hf.enable(tiny, hf.HyperPolicy(config=EXACT, min_query_len=1))
    position_ids = torch.cat([torch.arange(10), torch.arange(10)])[None]
    with pytest.raises(ValueError, match="packed"):
        with torch.no_grad():
            tiny(_ids(1, 20), position_ids=position_ids, use_cache=False)


@pytest.mark.parametrize("name", ["softcap", "position_bias", "s_aux"])
def test_unsupported_keyword_arguments_are_refused(name):
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    module = torch.nn.Module()
    module._hyperattn_policy = hf.HyperPolicy(config=EXACT, min_query_len=1)
    with pytest.raises(ValueError, match=name):
        hf.hyper_attention_forward(module, q, k, k, None, is_causal=True, **{name: torch.tensor(1.0)})


# ---------------------------------------------------------------------------------------
# the embedded SmolLM2 model


@pytest.fixture(scope="module")
def smol():
    from hyperattn.eval.model import EvalExtraMissing, load_embedded_model
    from hyperattn.eval.text import DEFAULT_TEXT, tokenize_text

    try:
        model, tokenizer = load_embedded_model(attn_implementation="hyper")
    except EvalExtraMissing as exc:
        pytest.skip(str(exc))
    ids = tokenize_text(tokenizer, DEFAULT_TEXT, 1100)
    return model, tokenizer, ids


@pytest.mark.model
def test_model_loads_with_hyper(smol):
    model, _, _ = smol
    assert model.config._attn_implementation == "hyper"


@pytest.mark.model
@pytest.mark.parametrize("budget", list(MODEL_BUDGETS), ids=list(MODEL_BUDGETS))
def test_model_logits_equal_sdpa_with_full_budget(smol, budget):
    model, _, ids = smol
    ids = ids[:, :96]
    ref = _logits(model, ids)
    out = _logits(model, ids, hf.HyperPolicy(config=MODEL_BUDGETS[budget], min_query_len=1))
    torch.testing.assert_close(out, ref, atol=MODEL_ATOL, rtol=0)


@pytest.mark.model
def test_model_left_padded_batch_equals_sdpa(smol):
    model, tokenizer, ids = smol
    tokenizer.padding_side = "left"
    texts = [tokenizer.decode(ids[0, :48]), tokenizer.decode(ids[0, 200:220])]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ref = _logits(model, batch.input_ids, attention_mask=batch.attention_mask)
    policy = hf.HyperPolicy(config=MODEL_BUDGETS["hyper-full-budget"], min_query_len=1)
    out = _logits(model, batch.input_ids, policy, attention_mask=batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=MODEL_ATOL, rtol=0)


@pytest.mark.model
def test_model_generate_equals_sdpa_with_full_budget(smol):
    model, _, ids = smol
    prompt = ids[:, :64]
    hf.disable(model)
    ref = model.generate(prompt, max_new_tokens=5, do_sample=False)
    hf.enable(model, hf.HyperPolicy(config=MODEL_BUDGETS["hyper-full-budget"], min_query_len=2))
    out = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.model
def test_model_generate_runs_with_default_config_on_long_prompt(smol, spy):
    model, _, ids = smol
    # the default configuration on the last 6 layers keeps the CPU time of CI short
    hf.enable(model, hf.HyperPolicy(layers=range(-6, 0)))
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    hf.disable(model)
    assert out.shape == (1, ids.shape[1] + 3)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    # the prefill (N = 1100, above the default min_seq_len of 1024) went through hyper in
    # those layers with the default configuration; the decode steps did not
    assert len(spy.calls) == 6 and {c[0] for c in spy.calls} == {ids.shape[1]}
    assert all(config == HyperAttentionConfig() for config in spy.configs)


# ---------------------------------------------------------------------------------------
# the prefill benchmark, on a tiny model on the CPU (the GPU run is a device job)


def test_prefill_bench_writes_every_row_and_a_plot(tmp_path):
    from hyperattn.bench.prefill import plot_prefill, run_prefill_bench

    out = tmp_path / "cpu-prefill.json"
    results = run_prefill_bench("tiny", lengths=[48], reps=1, out=str(out), methods=("hyper",), device="cpu")
    saved = json.loads(out.read_text())
    assert saved["rows"] == results["rows"]
    assert [(r["impl"], r["method"]) for r in saved["rows"]] == [("sdpa", None), ("hyper", "hyper"),
                                                                  ("hyper-last-half", "hyper")]
    assert all(r["ms"] is not None and r["ms"] > 0 and r["n"] == 48 for r in saved["rows"])
    assert {"device", "torch", "model", "rows"} <= saved.keys()
    plot_prefill(saved, str(tmp_path / "cpu-prefill.png"))
    assert (tmp_path / "cpu-prefill.png").stat().st_size > 0


def test_compiled_model_calls_the_opaque_op_and_settles_on_dynamic_shapes():
    # Issue 13: torch.compile traced into the method's selection and recompiled until the
    # recompile limit. Through the registered op the attention is one node of the graph.
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _tiny_model(num_layers=1)
    hf.enable(model, hf.HyperPolicy(config=HyperAttentionConfig(min_seq_len=64, seed=0), min_query_len=1))
    graphs = []

    class Recorder(CompileCounter):
        def __call__(self, gm, example_inputs):
            graphs.append(gm)
            return super().__call__(gm, example_inputs)

    counter = Recorder()
    compiled = torch.compile(model, backend=counter)
    frames = []
    with torch.no_grad():
        for n in (300, 400, 500):
            ids = _ids(1, n)
            assert torch.equal(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
            frames.append(counter.frame_count)
    assert frames[2] == frames[1]
    targets = {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert torch.ops.hyperattn.attention.default in targets or torch.ops.hyperattn.attention in targets


def test_training_gradients_through_the_op_equal_sdpa():
    # The integration calls the registered op, whose backward recomputes the forward: with a
    # full budget the parameter gradients are SDPA's.
    grads = {}
    for name, policy in (("sdpa", None), ("hyper", hf.HyperPolicy(config=FULL_HYPER, min_query_len=1))):
        model = _tiny_model(num_layers=2).train()
        if policy is not None:
            hf.enable(model, policy)
        ids = _ids(2, 40)
        model(ids, labels=ids).loss.backward()
        grads[name] = [p.grad for p in model.parameters()]
    for got, want in zip(grads["hyper"], grads["sdpa"]):
        assert torch.allclose(got, want, atol=TINY_ATOL)
