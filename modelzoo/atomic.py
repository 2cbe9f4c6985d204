"""Atomic file writes: whoever looks sees the old file or the new one whole, never a part.

Used by everything that writes a file a person or program reads later (checkpoints, data
cards, detector folders, reports), so a full disk, a kill or an error half-way leaves no
0-byte or truncated file behind.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write file ``path`` by calling ``write`` on a temporary file beside it, then renaming it over
    ``path``: whoever looks (and a run that fails half-way) sees the old file or the new one whole."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    # os.open with 0o666 leaves the permissions to the umask, as a plain open() would
    # (tempfile.mkstemp would make every file private to its owner).
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
