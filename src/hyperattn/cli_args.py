"""Argument types shared by the ``hyperattn`` subcommands: checked at parse time, before any work.

Each raises ``argparse.ArgumentTypeError``, which the command turns into one line on
stderr naming the argument, and exit status 2.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["positive_int", "nonnegative_int", "positive_float", "writable_file"]


def positive_int(text: str) -> int:
    """An int >= 1."""
    value = _number(text, int, "an int >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An int >= 0."""
    value = _number(text, int, "an int >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _number(text, float, "a float > 0")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a float > 0, got {text}")
    return value


def writable_file(text: str) -> str:
    """A path a file can be written to; checked by creating it (and removing it again if it was new).

    Results are written after minutes of work; a path that cannot take them must fail at once.
    """
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a file path, got the directory {text!r}")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"expected a path in an existing directory, but {parent!r} does not exist")
    existed = os.path.exists(text)
    try:
        with open(text, "a"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {exc.strerror}") from None
    if not existed:
        os.remove(text)
    return text


def _number(text: str, kind: type, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
