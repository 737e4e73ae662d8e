"""The benchmark harness: results schema, table, plot, SDPA extrapolation (CPU); the stage profile (CUDA)."""

from __future__ import annotations

import argparse

import pytest
import torch

from hyperattn.bench import cli
from hyperattn.bench.forward import BenchShape, exact_pairs, profile_hyper, run_forward_bench
from hyperattn.bench.plot import plot_results

ROW_KEYS = {"n", "causal", "backward", "impl", "config", "ms", "peak_gb"}


@pytest.fixture(scope="module")
def results():
    shape = BenchShape(heads=2, kv_heads=1, head_dim=32, dtype="float32")
    return run_forward_bench([128, 256], ["hyper", "sdpa-math", "sdpa-cudnn"], [True, False], shape,
                             torch.device("cpu"), max_n={"sdpa-math": 128}, budget_ms=5, min_reps=2, max_reps=2,
                             progress=False)


def test_results_follow_the_schema(results):
    assert {"device", "torch", "triton", "shape", "rows"} <= set(results)
    assert len(results["rows"]) == 2 * 2 * 3
    for row in results["rows"]:
        assert ROW_KEYS <= set(row)
        assert (row["ms"] is None) == ("error" in row)


def test_rows_that_cannot_run_say_why(results):
    by = {(r["n"], r["causal"], r["impl"]): r for r in results["rows"]}
    assert by[(128, True, "hyper")]["ms"] > 0
    assert "n > 128" in by[(256, True, "sdpa-math")]["error"]
    shape = BenchShape(heads=2, kv_heads=1, head_dim=32, dtype="float32")
    (flex,) = run_forward_bench([64], ["flex-sink-window"], [False], shape, torch.device("cpu"), progress=False)["rows"]
    assert "causal only" in flex["error"]
    # No cuDNN backend on a CPU: the failure is a row, not a crash.
    assert by[(128, False, "sdpa-cudnn")]["ms"] is None and by[(128, False, "sdpa-cudnn")]["error"]


def test_table_lists_every_row_and_speedups(results):
    table = cli.format_table(results)
    assert table.count("\n") == 1 + len(results["rows"])
    assert "1.0x" in table  # sdpa-math against itself


def test_fastest_sdpa_is_extrapolated_quadratically():
    rows = [{"n": 1024, "causal": True, "impl": "sdpa-flash", "ms": 2.0},
            {"n": 1024, "causal": True, "impl": "sdpa-cudnn", "ms": 1.0}]
    assert cli._fastest_sdpa(rows, 1024, True) == (1.0, False)
    assert cli._fastest_sdpa(rows, 4096, True) == (16.0, True)
    assert cli._fastest_sdpa(rows, 4096, False) == (None, False)


def test_exact_pairs_counts_the_causal_triangle():
    assert exact_pairs(4, True) == 10 and exact_pairs(4, False) == 16


def test_plot_writes_a_png(results, tmp_path):
    path = tmp_path / "bench.png"
    plot_results(results, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_json(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    path = tmp_path / "r.json"
    args = parser.parse_args(["--lengths", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                              "--causal", "yes", "--budget-ms", "1", "--json", str(path), "--no-progress"])
    assert cli.run(args) == 0
    assert '"impl": "hyper"' in path.read_text()


def test_context_parallel_script_parses_its_arguments():
    # The script runs under torchrun on GPUs; here only its import and argument parsing.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "context_parallel.py"
    spec = importlib.util.spec_from_file_location("context_parallel", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args([])
    assert args.lengths == [1 << 20, 1 << 21] and args.impls == ["structured-fixed", "hyper"] and not args.noncausal
    assert script.parse_args(["--lengths", "8192", "--impls", "hyper", "--reps", "2"]).reps == 2
    with pytest.raises(SystemExit):
        script.parse_args(["--reps", "0"])
    with pytest.raises(SystemExit):
        script.parse_args(["--impls", "streaming"])


def test_backward_rows_time_forward_and_backward(tmp_path):
    # The --backward plumbing on the CPU: rows flagged backward, gradients really computed
    # (a backward row costs more than the forward row of the same call), ratios within a mode.
    shape = BenchShape(heads=2, kv_heads=1, head_dim=16, dtype="float32")
    kwargs = dict(budget_ms=5, min_reps=3, max_reps=3, progress=False)
    fwd = run_forward_bench([256], ["hyper", "structured-fixed", "sdpa-math"], [True], shape, torch.device("cpu"),
                            **kwargs)
    bwd = run_forward_bench([256], ["hyper", "structured-fixed", "sdpa-math"], [True], shape, torch.device("cpu"),
                            backward=True, **kwargs)
    assert all(r["backward"] is True and r["ms"] > 0 for r in bwd["rows"])
    assert all(r["backward"] is False for r in fwd["rows"])
    assert bwd["rows"][2]["ms"] > fwd["rows"][2]["ms"]  # sdpa-math: autograd.grad ran
    merged = {**fwd, "rows": fwd["rows"] + bwd["rows"]}
    # Each row's speed-up is to the SDPA row of its own mode.
    assert cli._fastest_sdpa(merged["rows"], 256, True, backward=True) == (bwd["rows"][2]["ms"], False)
    assert cli._fastest_sdpa(merged["rows"], 256, True) == (fwd["rows"][2]["ms"], False)
    table = cli.format_table(merged)
    assert table.count("fwd+bwd") == 3 and table.count(" fwd ") == 3
    plot_results(merged, str(tmp_path / "bwd.png"))
    assert (tmp_path / "bwd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_backward_flag_writes_backward_rows(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    path = tmp_path / "r.json"
    args = parser.parse_args(["--lengths", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                              "--causal", "yes", "--budget-ms", "1", "--json", str(path), "--no-progress",
                              "--backward"])
    assert cli.run(args) == 0
    import json

    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["backward"] is True for r in rows)
    # Every row ran, except those the bench skips by design (on CUDA: flex-sink-window below
    # its lengths), which say so.
    assert all(r["ms"] is not None or r["error"].startswith("skipped:") for r in rows)
    assert any(r["ms"] is not None for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the profile times the CUDA path")
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_profile_splits_the_call_into_stages(backward):
    shape = BenchShape(batch=1, heads=4, kv_heads=2, head_dim=64, dtype="bfloat16")
    # 16k: the smallest causal length with an approximate piece at the default min_seq_len (4096).
    prof = profile_hyper(16384, True, shape, torch.device("cuda"), reps=1, backward=backward)
    stages = prof["stages_ms"]
    assert prof["backward"] is backward
    assert abs(sum(stages.values()) - prof["total_ms"]) < 1e-6 and prof["total_ms"] > 0
    assert stages["exact pieces"] > 0 and stages["approximate pieces"] > 0
    # The backward's own launches are found and counted only when there is a backward.
    assert (stages.get("exact pieces backward", 0.0) > 0) is backward
    assert (stages.get("approximate pieces backward", 0.0) > 0) is backward


def test_cli_min_seq_len_sets_both_structured_rows(tmp_path):
    # The flag times the structured rows at a given crossover; each row's config records the
    # value it ran with (without it: the method's own for structured, 4096 for the fixed row).
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    import json

    def rows(*extra):
        path = tmp_path / "r.json"
        args = parser.parse_args(["--lengths", "512", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                                  "--causal", "yes", "--budget-ms", "1", "--json", str(path), "--no-progress",
                                  "--impls", "structured", "structured-fixed", *extra])
        assert cli.run(args) == 0
        return {r["impl"]: r for r in json.loads(path.read_text())["rows"]}

    given = rows("--min-seq-len", "256")
    assert all(r["ms"] is not None and r["config"]["min_seq_len"] == 256 for r in given.values())
    default = rows()
    assert default["structured-fixed"]["config"]["min_seq_len"] == 4096
    assert default["structured"]["config"]["min_seq_len"] == 1024  # the CPU default
    with pytest.raises(SystemExit):
        parser.parse_args(["--min-seq-len", "0"])
