"""Argument-parsing pieces shared by the subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn


class UsageError(Exception):
    """Bad command-line input found after parsing; reported as one line, exit code 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_key_values(text: str, name: str) -> dict[str, float]:
    """Parse ``"adam=1e-3,sgd=0.1"`` into ``{"adam": 0.001, "sgd": 0.1}``."""
    result: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{name} expects NAME=VALUE pairs separated by commas, got {item!r}")
        try:
            result[key.strip().lower()] = float(value)
        except ValueError:
            raise UsageError(f"{name}: {value!r} is not a number (in {item!r})") from None
    return result


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """An aligned text table under a rule, the first column left-aligned and the others right-aligned."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_list(text: str) -> list[str]:
    """Parse ``"a, b,c"`` into ``["a", "b", "c"]`` (lower case, empty items dropped)."""
    return [part.strip().lower() for part in text.split(",") if part.strip()]


def output_folder(text: str) -> Path:
    """An argparse ``type`` for ``--out``: a folder this command can create or write in.

    Checked when the command line is parsed, before anything runs, so that a bad ``--out``
    is one line and exit 2 rather than a traceback after the work is done: an existing
    file (``/dev/null`` included) or a path under a file is refused, and a missing folder
    is created and removed again, which is the only test that holds for root and for file
    systems such as ``/proc`` whose permission bits do not tell.
    """
    try:
        return check_output_folder(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def check_output_folder(text: str) -> Path:
    """:func:`output_folder`'s checks, for a folder that was not given but computed (a default)."""
    if not text.strip():
        raise UsageError("the folder name is empty")
    path = Path(text)
    try:
        if path.exists():
            if not path.is_dir():
                raise UsageError(f"{text!r} exists and is not a folder")
            if not os.access(path, os.W_OK | os.X_OK):
                raise UsageError(f"cannot write in {text!r}")
            return path
        missing = [path]
        while not missing[-1].parent.exists() and missing[-1].parent != missing[-1]:
            missing.append(missing[-1].parent)
        existing = missing[-1].parent
        if not existing.is_dir():
            raise UsageError(f"{text!r} is under {str(existing)!r}, which is not a folder")
        path.mkdir(parents=True)
        for created in missing:  # deepest first: only what this check made
            created.rmdir()
    except OSError as error:  # cannot create it, a name too long, a loop of links, ...
        raise UsageError(f"cannot create {text!r}: {error.strerror}") from None
    return path


def out_of_memory(error: BaseException) -> str | None:
    """One line for an allocation that failed (``MemoryError`` or torch's allocator error), else ``None``.

    torch reports a failed CPU allocation as a ``RuntimeError`` from ``DefaultCPUAllocator``
    ("can't allocate memory: you tried to allocate N bytes"); CUDA as ``OutOfMemoryError``.
    """
    import re

    text = str(error)
    if not (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))):
        return None
    size = re.search(r"allocate (\d+) bytes", text) or re.search(r"allocate ([\d.]+ [KMGT]i?B)", text)
    amount = "" if size is None else (
        f": tried to allocate {int(size.group(1)) / 1e9:.3g} GB" if size.group(1).isdigit() else
        f": tried to allocate {size.group(1)}")
    return f"out of memory{amount}; ask for less (a smaller batch, model or problem)"
