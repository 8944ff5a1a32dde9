"""Give memory that was freed back to the operating system.

A build allocates and frees the same amounts over and over (image buffers in a hundred threads,
Arrow buffers while staging files are written and read back). glibc keeps freed blocks in
per-thread arenas and Arrow's allocator keeps freed pages for reuse, so without this a
process's RSS creeps up with the work done although what it uses does not. Called once per
committed chunk and per written shard: cheap next to either.
"""

from __future__ import annotations

import ctypes

import pyarrow as pa

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def release_freed_memory() -> None:
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
