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
