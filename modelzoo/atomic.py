"""Atomic file writes: whoever looks sees the old file or the new one whole, never a part.

Used by everything that writes a file a person or program reads later (checkpoints, data
cards, detector folders, reports), so a full disk, a kill or an error half-way leaves no
0-byte or truncated file behind.
"""

from __future__ import annotations

import fnmatch
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from modelzoo.errors import WeightbiasError


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


def check_output_folder(path: str | Path, marker: str, own: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output folder that may not be written: a place inside a Zarr
    store, a file, or a folder holding other things. A folder holding ``marker`` and nothing but
    files named like ``own`` (glob patterns) is an earlier output of the same kind, which a new
    one replaces whole. Raises :class:`OutputFolderError`."""
    path = Path(path)
    for folder in (path.absolute(), *path.absolute().parents):
        if (folder / "zarr.json").is_file():
            raise OutputFolderError(f"{path} lies inside the Zarr store {folder}; write it elsewhere "
                                    "(a store holds only its zoo)")
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{path} is a file, not a folder; give a new folder")
    if path.is_dir() and any(path.iterdir()):
        others = sorted(entry.name for entry in path.iterdir() if not entry.is_file()
                        or not any(fnmatch.fnmatch(entry.name, pattern) for pattern in (marker, *own)))
        if not (path / marker).is_file() or others:
            raise OutputFolderError(f"{path} holds other files ({', '.join(others[:3]) or 'no ' + marker}); "
                                    "give a new or empty folder (an earlier output of this kind, and "
                                    "nothing else, is replaced)")
    parents = (path.absolute().parent, *path.absolute().parents)
    existing = next(folder for folder in parents if folder.exists())
    if not os.access(existing, os.W_OK):  # a read-only file system or folder: say so before any work
        raise OutputFolderError(f"{path}: cannot write in {existing} (read-only); give a folder you can "
                                "write to")
    return path


@contextmanager
def staged_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to write into; when the block ends without an error it
    replaces ``path`` whole (an earlier one is removed only then), and otherwise it is removed:
    a failure or a kill half-way leaves ``path`` as it was, and no partial folder."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        staging.mkdir(parents=True)
        yield staging
        if path.exists():
            old = staging.with_suffix(".old")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class OutputFolderError(WeightbiasError, ValueError):
    """An output folder that is a file, inside a store, or holds other things."""
