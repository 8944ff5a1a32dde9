"""Reading a local file named by input from strangers: regular files only.

`open()` on a FIFO waits for a writer forever and a device can be endless, so a file is opened
non-blocking and checked with `fstat` before a byte is read. Used for URL-list paths (download),
image folders' caption files (reader) and `mmae embed`'s inputs."""

from __future__ import annotations

import os
import stat


class NotARegularFile(OSError):
    """The path names a FIFO, device or folder."""


def read_regular_file(path: str, limit: int) -> tuple[bytes, int]:
    """(at most `limit` + 1 bytes, the file's size). Raises FileNotFoundError, PermissionError,
    NotARegularFile or another OSError. The descriptor is closed on every path."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path}: not a regular file (FIFO, device or folder)")
        handle = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with handle:
        if info.st_size > limit:
            return b"", info.st_size
        return handle.read(limit + 1), info.st_size


def inside(path: str, folder: str) -> bool:
    """Is `path`, with every link resolved, inside `folder` (links resolved too)?"""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip("/") + "/")


def check_regular(url: str) -> None:
    """Raise NotARegularFile if `url` is a local FIFO, device or folder (opening a FIFO waits for
    a writer forever); anything else (a regular file, a missing one, a remote URL) passes, and
    opening it says what is wrong."""
    if "://" in url and not url.startswith(("file://", "local://")):
        return
    path = url.split("://", 1)[1] if "://" in url else url
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{url}: not a regular file (FIFO, device or folder)")
