"""Argument-parsing pieces shared by the subcommands."""

from __future__ import annotations

import argparse
import sys
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


def parse_list(text: str) -> list[str]:
    """Parse ``"a, b,c"`` into ``["a", "b", "c"]`` (lower case, empty items dropped)."""
    return [part.strip().lower() for part in text.split(",") if part.strip()]
