"""Reading a local file named by input from strangers: regular files only.

`open()` on a FIFO waits for a writer forever and a device can be endless, so a file is opened
non-blocking and checked with `fstat` before a byte is read. Used for URL-list paths (download)
and image folders' caption files (reader)."""

from __future__ import annotations

import os
import stat


class NotARegularFile(OSError):
    """The path names a FIFO, device or folder."""


def read_regular_file(path: str, limit: int) -> tuple[bytes, int]:
    """(at most `limit` + 1 bytes, the file's size). Raises FileNotFoundError, PermissionError,
    NotARegularFile or another OSError."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path}: not a regular file (FIFO, device or folder)")
        if info.st_size > limit:
            return b"", info.st_size
        return handle.read(limit + 1), info.st_size
