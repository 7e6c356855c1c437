"""Reading the files a user names: regular files only, of a bounded size.

A path given on the command line or in a config may name anything: a folder, ``/dev/zero``
(endless: ``read()`` never returns and the process ends in the OOM killer), a FIFO (``open``
blocks until someone writes), a file of many gigabytes. Every file gradwise reads because
a user named it (a ``--config``, a topology, a job table, ``--data``) goes through
:func:`read_user_file`: it opens without blocking, requires a regular file, and reads at
most the cap given plus one byte, so that a file that grows while it is read is refused
too. Errors are ``ValueError`` naming what the file is for and the path; the command line
prints them as one line. The bytes are parsed by the caller with a reader that runs no
code (TOML, JSON, CSV, ``numpy.load(allow_pickle=False)``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_CONFIG_BYTES = 1 << 20
"""A settings file (TOML) is a few hundred bytes; 1 MiB is generous."""
MAX_TABLE_BYTES = 64 << 20
"""Topologies and job tables (CSV, JSON): 64 MiB is about a million rows."""
MAX_DATA_BYTES = 4 << 30
"""Training data is read whole into memory: 4 GiB is the most a CPU run here should hold."""


def _size(count: int) -> str:
    return f"{count / 2**20:.0f} MiB" if count < 2**30 else f"{count / 2**30:.0f} GiB"


def check_user_file(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path`` if it names a regular file (following links); else a ``ValueError``."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except OSError as error:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {error.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {str(path)!r} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {str(path)!r} is not a regular file (a device, pipe or socket)")
    return path


def read_user_file(path: str | Path, what: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, refused if it holds more than ``max_bytes``.

    ``what`` names the file's role in the errors (``"config file"``, ``"data file"``).
    """
    path = check_user_file(path, what)
    try:
        # O_NONBLOCK: should the path have become a FIFO since the check, open returns at once.
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {error.strerror}") from None
    with os.fdopen(handle, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ValueError(f"{what} {str(path)!r} is not a regular file (a device, pipe or socket)")
        try:
            data = file.read(max_bytes + 1)
        except OSError as error:
            raise ValueError(f"{what} {str(path)!r} cannot be read: {error.strerror}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{what} {str(path)!r} is larger than the {_size(max_bytes)} gradwise reads for it")
    return data


def read_user_text(path: str | Path, what: str, max_bytes: int) -> str:
    """:func:`read_user_file` decoded as UTF-8 (a byte-order mark is dropped)."""
    data = read_user_file(path, what, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason})") from None
