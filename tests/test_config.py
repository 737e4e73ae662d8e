import pytest

from hyperattn import METHODS, HyperAttentionConfig


def test_defaults_follow_the_design():
    cfg = HyperAttentionConfig()
    assert (cfg.lsh_num_projs, cfg.block_size, cfg.sample_size) == (7, 256, 256)
    assert cfg.method == "structured"
    assert HyperAttentionConfig(method="hyper").effective_min_seq_len == 4096
    assert HyperAttentionConfig(method="hyper", min_seq_len=10).effective_min_seq_len == 10


def test_frozen():
    cfg = HyperAttentionConfig()
    with pytest.raises(AttributeError):
        cfg.block_size = 3
    assert cfg.replace(block_size=64).block_size == 64


@pytest.mark.parametrize("field,value,error", [
    ("lsh_num_projs", 0, ValueError),
    ("lsh_num_projs", 17, ValueError),
    ("lsh_num_projs", 2.0, TypeError),
    ("block_size", 0, ValueError),
    ("block_size", True, TypeError),
    ("sample_size", -1, ValueError),
    ("min_seq_len", -5, ValueError),
    ("min_seq_len", "4096", TypeError),
    ("seed", -1, ValueError),
    ("method", "flash", ValueError),
    ("window", -1, ValueError),
    ("num_sinks", -1, ValueError),
    ("heavy_columns", -1, ValueError),
    ("probe_rows", -1, ValueError),
    ("max_error", 0.0, ValueError),
    ("max_error", float("nan"), ValueError),
    ("max_error", "0.1", TypeError),
    ("check_finite", 1, TypeError),
], ids=lambda x: str(x))
def test_bad_values_name_the_field(field, value, error):
    with pytest.raises(error, match=field):
        HyperAttentionConfig(**{field: value})


def test_every_method_is_constructible():
    for method in METHODS:
        assert HyperAttentionConfig(method=method).method == method


def test_probe_rows_zero_with_the_guard_is_refused():
    # With no probe rows the guard would report 0 error for every head and never fall back
    # (issue 13: true error 2.59 reported as 0).
    with pytest.raises(ValueError, match="probe_rows"):
        HyperAttentionConfig(probe_rows=0, max_error=0.05)
    with pytest.raises(ValueError, match="probe_rows"):
        HyperAttentionConfig(max_error=0.05).replace(probe_rows=0)
    assert HyperAttentionConfig(probe_rows=0, max_error=None).probe_rows == 0
    # The peers' own use of probe rows has no guard to blind.
    assert HyperAttentionConfig(method="vertical_slash", probe_rows=0).probe_rows == 0


@pytest.mark.parametrize("seed", [2**63, 2**64 + 5, 2**70], ids=["2**63", "2**64+5", "2**70"])
def test_seed_past_int64_is_refused_with_the_range(seed):
    with pytest.raises(ValueError, match=r"seed: .*\[0, 2\*\*63 - 1\]"):
        HyperAttentionConfig(seed=seed)


@pytest.mark.parametrize("method", METHODS)
def test_largest_seed_runs(method):
    import torch

    import hyperattn as ha

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 300, 16, generator=gen)
    k, v = torch.randn(2, 1, 2, 300, 16, generator=gen)
    cfg = HyperAttentionConfig(method=method, seed=2**63 - 1, min_seq_len=64, block_size=32, sample_size=32)
    out = ha.hyper_attention(q, k, v, causal=True, config=cfg)
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
