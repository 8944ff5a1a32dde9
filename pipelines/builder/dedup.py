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
import fsspec
import numpy as np
from .neardup import IMAGE_NEAR, NEAR
from .records import ChunkKey, KeyFile, Packed
from ..shards import write_atomic

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

    def add_keys(self, high: np.ndarray, low: np.ndarray, index: int, row_id: str) -> None:
        """Many keys of one row at once, as two uint64 arrays (the key's first and last 8 bytes,
        big-endian), bucketed as `add` buckets them."""
        self.add_many(high, low, np.zeros(len(high), dtype=np.intp), [index], [row_id])

    def add_many(self, high: np.ndarray, low: np.ndarray, owner: np.ndarray, indices: list[int],
                 row_ids: list[str]) -> None:
        """Keys of many rows at once: the keys' halves, and per key which of the rows (`indices`
        in the chunk, `row_ids`) it is of. One sort puts them in their buckets."""
        if not len(high):
            return
        entries = np.zeros(len(high), ENTRY_DTYPE)
        entries["key_high"], entries["key_low"] = high, low
        entries["index"] = np.asarray(indices, dtype=np.uint32)[owner]
        entries["id"] = _ids(row_ids)[owner]
        buckets = high.astype(np.uint64).byteswap() % np.uint64(self.buckets)  # the first 8 bytes little-endian, as in add
        order = np.argsort(buckets, kind="stable")
        buckets, entries = buckets[order], entries[order]
        starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(buckets)]):
            self.parts.setdefault(int(buckets[start]), bytearray()).extend(entries[start:stop].tobytes())

    def items(self) -> Iterator[tuple[int, bytes]]:
        for bucket in sorted(self.parts):
            yield bucket, bytes(self.parts[bucket])

    def spill(self, url: str) -> Iterator[tuple[int, KeyFile]]:
        """Write every bucket's entries to one file and give, per bucket, where its part lies:
        near-duplicate keys (14-24 per row) stay out of the shuffle, which on the embedded
        runner is held in memory; only these references (a few per chunk) cross it."""
        if not self.parts:
            return
        data, places = bytearray(), []
        for bucket in sorted(self.parts):
            places.append((bucket, KeyFile(url, len(data), len(self.parts[bucket]))))
            data.extend(self.parts[bucket])
        write_atomic(url, bytes(data))
        yield from places


def _ids(row_ids: list[str]) -> np.ndarray:
    """Row ids (20 hex digits) as the packed entries hold them, one 10-byte value each."""
    data = bytes.fromhex("".join(row_ids))
    if len(data) != 10 * len(row_ids):
        raise ValueError(f"row ids must be 20 hex digits: {row_ids[:3]}")
    return np.frombuffer(data, "V10")


def entries_of(pack: Packed) -> bytes:
    """A pack's entries, read from its key file when it was spilled."""
    if not isinstance(pack.entries, KeyFile):
        return pack.entries
    with fsspec.open(pack.entries.url, "rb") as handle:
        handle.seek(pack.entries.offset)
        return handle.read(pack.entries.length)


ENTRY_DTYPE = np.dtype([("key_high", ">u8"), ("key_low", ">u8"), ("index", "<u4"), ("id", "V10")])


def later_copies(element: tuple[int, Iterable[Packed]], max_distance: int = 0) -> Iterator[tuple[ChunkKey, Duplicates]]:
    """One bucket -> (chunk, [(index, "same url as <first id>"), ...]) for chunks with later copies.

    The bucket is sorted as numpy arrays (42 bytes per row), not as Python objects. Image band
    keys (`neardup.IMAGE_NEAR`) match when their bands are equal and their hashes, the key's low
    half, differ in at most `max_distance` bits."""
    _, packs = element
    packs = sorted(packs, key=lambda pack: pack.chunk)
    if not packs:
        return
    loaded = [entries_of(pack) for pack in packs]
    entries = np.concatenate([np.frombuffer(data, ENTRY_DTYPE) for data in loaded])
    sizes = [len(data) // ENTRY.size for data in loaded]
    del loaded
    ordinal = np.repeat(np.arange(len(packs), dtype=np.uint32), sizes)
    near_image = np.repeat(np.array([pack.what == IMAGE_NEAR for pack in packs]), sizes)
    found: dict[int, Duplicates] = {}
    for position, kept in _exact_matches(entries, ordinal, np.flatnonzero(~near_image)):
        what, first_id = packs[ordinal[kept]].what, entries["id"][kept].tobytes().hex()
        detail = f"{what} of {first_id} (shares a MinHash band)" if what == NEAR else f"same {what} as {first_id}"
        found.setdefault(int(ordinal[position]), []).append((int(entries["index"][position]), detail))
    # A row's variants and bands may match several times: the closest match (then the first) speaks.
    closest: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for position, kept, distance in _close_hashes(entries, ordinal, np.flatnonzero(near_image), max_distance):
        row = (int(ordinal[position]), int(entries["index"][position]))
        closest[row] = min(closest.get(row, (65, 0, 0, 0)), (distance, int(ordinal[kept]), int(entries["index"][kept]), kept))
    for (number, index), (distance, _, _, kept) in closest.items():
        detail = f"{NEAR} of {entries['id'][kept].tobytes().hex()} (image hash {distance} of 64 bits apart)"
        found.setdefault(number, []).append((index, detail))
    for number in sorted(found):
        yield packs[number].chunk, sorted(set(found[number]))


def _exact_matches(entries: np.ndarray, ordinal: np.ndarray, among: np.ndarray) -> Iterator[tuple[int, int]]:
    """(entry, the first entry in input order with the same 16-byte key) for every later copy."""
    if len(among) < 2:
        return
    order = among[np.lexsort((entries["index"][among], ordinal[among], entries["key_low"][among],
                              entries["key_high"][among]))]
    high, low = entries["key_high"][order], entries["key_low"][order]
    later = np.zeros(len(order), dtype=bool)
    later[1:] = (high[1:] == high[:-1]) & (low[1:] == low[:-1])
    # For each row, the position (in sorted order) of the first row with its key.
    starts = np.where(later, 0, np.arange(len(order)))
    first = order[np.maximum.accumulate(starts)]
    for position in np.flatnonzero(later):
        yield int(order[position]), int(first[position])


# A row is compared with at most this many rows before it in its band group: a group that large
# (a band value shared by that many images) costs GROUP_CAP comparisons per row, not its size.
GROUP_CAP = 4096


def _close_hashes(entries: np.ndarray, ordinal: np.ndarray, among: np.ndarray,
                  max_distance: int) -> Iterator[tuple[int, int, int]]:
    """(entry, the closest earlier entry of another row in its band group whose hash is within
    `max_distance` bits (of equally close ones, the first), the distance) for every entry that
    has one. Vectorised over all groups at once: pass k compares every entry with the entry k
    places before it in its group, for k up to the largest group (at most GROUP_CAP)."""
    if len(among) < 2:
        return
    order = among[np.lexsort((entries["index"][among], ordinal[among], entries["key_high"][among]))]
    high, low = entries["key_high"][order], entries["key_low"][order]
    rows = ordinal[order].astype(np.uint64) << np.uint64(32) | entries["index"][order].astype(np.uint64)
    starts = np.flatnonzero(np.r_[True, high[1:] != high[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    candidates = np.flatnonzero(np.arange(len(order)) - group_start >= 1)
    later, earlier, distances = [], [], []
    offset = 1
    while len(candidates) and offset <= GROUP_CAP:
        before = candidates - offset
        distance = np.bitwise_count(low[candidates] ^ low[before])
        close = (distance <= max_distance) & (rows[candidates] != rows[before])
        later.append(candidates[close])
        earlier.append(before[close])
        distances.append(distance[close])
        offset += 1
        candidates = candidates[candidates - group_start[candidates] >= offset]
    later, earlier, distances = np.concatenate(later), np.concatenate(earlier), np.concatenate(distances)
    if not len(later):
        return
    pick = np.lexsort((earlier, distances, later))
    first = pick[np.r_[True, later[pick][1:] != later[pick][:-1]]]
    for position in first:
        yield int(order[later[position]]), int(order[earlier[position]]), int(distances[position])


class FindDuplicates(beam.PTransform):
    """(bucket, packed entries) -> (chunk, duplicates): every row whose hash an earlier row has
    (or, for image band keys, a hash within `max_distance` bits of an earlier row's)."""

    def __init__(self, max_distance: int = 0) -> None:
        super().__init__()
        self.max_distance = max_distance

    def expand(self, packed):
        return (
            packed
            | "Group" >> beam.GroupByKey()
            | "LaterCopies" >> beam.FlatMap(later_copies, self.max_distance)
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
