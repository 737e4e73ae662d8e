"""The ``hyperattn`` command: bad arguments and unwritable outputs refused before any work, one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hyperattn import cli


def _main(argv, capsys):
    """Exit status and stderr of ``hyperattn argv``, run in-process."""
    with pytest.raises(SystemExit) as info:
        raise SystemExit(cli.main(argv))
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv,names", [
    (["bench", "--lengths", "-5"], "--lengths"),
    (["bench", "--lengths", "0"], "--lengths"),
    (["bench", "--lengths", "1024", "x"], "--lengths"),
    (["bench", "--heads", "3", "--kv-heads", "2"], "--kv-heads"),
    (["bench", "--heads", "0"], "--heads"),
    (["bench", "--budget-ms", "-1"], "--budget-ms"),
    (["bench", "--max-n", "bogus"], "--max-n"),
    (["bench", "--json", "/nonexistent-dir/r.json"], "--json"),
    (["bench", "--plot", "/nonexistent-dir/r.png"], "--plot"),
    (["eval", "--json", "/nonexistent-dir/e.json"], "--json"),
    (["eval", "--plot", "/nonexistent-dir/e.png"], "--plot"),
    (["eval", "--tokens", "0"], "--tokens"),
    (["eval", "--rows", "-1"], "--rows"),
    (["eval", "--min-row", "-1"], "--min-row"),
    (["eval", "--device", "tpu"], "--device"),
    (["capture", "/nonexistent-dir/qkv.pt"], "output"),
    (["capture", "/proc/qkv.pt"], "output"),
    (["capture", "qkv.pt", "--tokens", "-3"], "--tokens"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_bad_arguments_exit_2_with_one_line_naming_them(argv, names, capsys, monkeypatch):
    # Anything past the checks (loading the model, timing) would take seconds to minutes;
    # refused arguments must never get there.
    import hyperattn.bench.forward as forward
    import hyperattn.eval.model as model

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(forward, "run_forward_bench", no_work)
    monkeypatch.setattr(model, "load_embedded_model", no_work)
    code, err = _main(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and names in err and err.startswith("hyperattn ")


def test_capture_into_a_directory_is_refused(tmp_path, capsys):
    code, err = _main(["capture", str(tmp_path)], capsys)
    assert code == 2 and "directory" in err


def test_writable_output_check_leaves_no_file(tmp_path):
    from hyperattn.cli_args import writable_file

    path = tmp_path / "r.json"
    assert writable_file(str(path)) == str(path)
    assert not path.exists()


def test_console_script_exits_2_on_negative_length():
    done = subprocess.run([sys.executable, "-m", "hyperattn.cli", "bench", "--lengths", "-5"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["hyperattn bench: argument --lengths: expected an int >= 1, got -5"]
