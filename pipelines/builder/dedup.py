"""Exact deduplication; the row that came first in the input wins, whatever order the runner
delivers rows in.

Used twice: before downloading (the same URL within a source, the same cleaned text; the later
copies are rejected by the download stage without being fetched) and after it (the same stored
image, plus caption for paired rows, within a kind; the shard writer leaves the copies out and
the reject writer files them).

Only packed bytes cross the shuffle: per chunk and bucket, one string of 30-byte entries
`(16-byte hash, index in the chunk, 10-byte row id)`. A bucket (~`plan.ROWS_PER_BUCKET` rows)
is sorted in one worker; what comes out is, per chunk with duplicates, its duplicates' indices
and details (usually few).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
import numpy as np
from .neardup import NEAR
from .records import ChunkKey, Packed

KEYS = "keys"  # the tagged output that carries packed hashes
ENTRY = struct.Struct("<16sI10s")

Duplicates = list[tuple[int, str]]  # (index in the chunk, reject detail), per chunk


def _digest(*parts: str) -> bytes:
    text = "\x00".join(parts)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def url_key(record: dict[str, Any]) -> bytes:
    """The same URL within a source."""
    return _digest("url", record["source"], record["url"])


def text_key(record: dict[str, Any]) -> bytes:
    """The same cleaned text."""
    return _digest("text", record["caption"])


def image_key(kind: str, sha256: str, caption: Optional[str]) -> bytes:
    """The same stored image within a kind; paired rows keep one row per (image, caption), so
    COCO-style multiple captions of one image are not duplicates."""
    return _digest("image", kind, sha256, caption if caption is not None else "")


class HashPacker:
    """Collects one chunk's entries per bucket."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets
        self.parts: dict[int, bytearray] = {}

    def add(self, key: bytes, index: int, row_id: str) -> None:
        bucket = int.from_bytes(key[:8], "little") % self.buckets
        self.parts.setdefault(bucket, bytearray()).extend(ENTRY.pack(key, index, bytes.fromhex(row_id)))

    def items(self) -> Iterator[tuple[int, bytes]]:
        for bucket in sorted(self.parts):
            yield bucket, bytes(self.parts[bucket])


ENTRY_DTYPE = np.dtype([("key_high", ">u8"), ("key_low", ">u8"), ("index", "<u4"), ("id", "V10")])


def later_copies(element: tuple[int, Iterable[Packed]]) -> Iterator[tuple[ChunkKey, Duplicates]]:
    """One bucket -> (chunk, [(index, "same url as <first id>"), ...]) for chunks with later copies.

    The bucket is sorted as numpy arrays (42 bytes per row), not as Python objects."""
    _, packs = element
    packs = sorted(packs, key=lambda pack: pack.chunk)
    if not packs:
        return
    chunks = [pack.chunk for pack in packs]
    entries = np.concatenate([np.frombuffer(pack.entries, ENTRY_DTYPE) for pack in packs])
    ordinal = np.repeat(np.arange(len(packs), dtype=np.uint32), [len(pack.entries) // ENTRY.size for pack in packs])
    order = np.lexsort((entries["index"], ordinal, entries["key_low"], entries["key_high"]))
    high, low = entries["key_high"][order], entries["key_low"][order]
    later = np.zeros(len(order), dtype=bool)
    later[1:] = (high[1:] == high[:-1]) & (low[1:] == low[:-1])
    if not later.any():
        return
    # For each row, the position (in sorted order) of the first row with its key.
    starts = np.where(later, 0, np.arange(len(order)))
    first = order[np.maximum.accumulate(starts)]
    found: dict[int, Duplicates] = {}
    for position in np.flatnonzero(later):
        row, kept = order[position], first[position]
        what, first_id = packs[ordinal[kept]].what, entries["id"][kept].tobytes().hex()
        detail = f"{what} of {first_id} (shares a MinHash band)" if what == NEAR else f"same {what} as {first_id}"
        found.setdefault(int(ordinal[row]), []).append((int(entries["index"][row]), detail))
    for number in sorted(found):
        yield chunks[number], sorted(found[number])


class FindDuplicates(beam.PTransform):
    """(bucket, packed entries) -> (chunk, duplicates): every row whose hash an earlier row has."""

    def expand(self, packed):
        return (
            packed
            | "Group" >> beam.GroupByKey()
            | "LaterCopies" >> beam.FlatMap(later_copies)
        )


def duplicates_of(side: Any, chunk: ChunkKey) -> dict[int, str]:
    """index -> detail for one chunk, from an `AsMultiMap` side input of FindDuplicates' output."""
    found: dict[int, str] = {}
    for duplicates in side[chunk] if side is not None else ():
        for index, detail in duplicates:
            # An exact copy says so even when its bands matched too; of several near matches
            # the smallest detail is kept, so the answer does not depend on the runner's order.
            if index not in found or (found[index].startswith(NEAR), found[index]) > (detail.startswith(NEAR), detail):
                found[index] = detail
    return found
