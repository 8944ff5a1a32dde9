"""What the loader reads: streams of rows, and one slot's endless, shuffled view of a stream.

- Each kind (or, with `source_weights`, each source inside a kind) is a `Stream`: the row groups
  that hold its rows (footers only; built once in the main process) and its share of every batch.
- A `SlotStream` is the rows of a stream that one global slot reads, epoch after epoch. In epoch
  `e` the stream's row groups are shuffled by `(seed, stream, e)` and dealt round-robin to the
  `world_size * slots` global slots (split into strided row sets when there are fewer row groups
  than slots), so within a stream epoch no row is seen twice or skipped.
- Inside a slot's epoch, rows are permuted within consecutive windows of `shuffle_window` rows: a
  bounded shuffle buffer whose order is computed, not stored. Memory holds about one window per
  stream, whatever the dataset size.
- `RowGroupReader` reads row groups (projected columns) with a small read-ahead pool.
- Which streams a run has, from its datasets' manifests, is `data_plan`.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import math
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from mmae.schemas.shard import SCHEMA_VERSION, SHARD_SCHEMA

log = logging.getLogger("mmae.data")

COLUMNS = {
    "paired": ["id", "source", "tokens", "image", "label"],
    "image": ["id", "source", "image", "label"],
    "text": ["id", "source", "tokens", "label"],
}


class DataError(RuntimeError):
    """A shard that cannot be read; the message names the file (and row group)."""


class BadData(ValueError):
    """A shard or row group that reads but holds what schema v1 does not allow."""


def check_columns(schema: pa.Schema, columns: list[str]) -> None:
    """The columns the trainer reads have schema v1's types (tokens: a list of integers)."""
    for name in columns:
        expected = SHARD_SCHEMA.field(name).type
        if name not in schema.names:
            raise BadData(f"no {name!r} column")
        found = schema.field(name).type
        if name == "tokens":
            ok = (pa.types.is_list(found) or pa.types.is_large_list(found)) and pa.types.is_integer(found.value_type)
        elif name == "image":
            ok = pa.types.is_binary(found) or pa.types.is_large_binary(found)
        else:
            ok = found.equals(expected) or (pa.types.is_string(expected) and pa.types.is_large_string(found))
        if not ok:
            raise BadData(f"column {name!r} is {found}, schema v{SCHEMA_VERSION} has {expected}")


def check_token_range(table: pa.Table, vocab_size: int) -> None:
    """Every token id in [0, vocab_size): an id outside would index past the embedding table."""
    if not vocab_size or "tokens" not in table.column_names:
        return
    values = pc.list_flatten(table.column("tokens"))
    if len(values) == 0:
        return
    extremes = pc.min_max(values).as_py()
    if extremes["min"] is not None and (extremes["min"] < 0 or extremes["max"] >= vocab_size):
        raise BadData(f"token ids range {extremes['min']}..{extremes['max']}, outside the tokenizer's "
                      f"0..{vocab_size - 1}")


def seed_of(*parts: Any) -> int:
    text = "\x00".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Stream:
    """The rows of one kind (or one source of a kind) and their share of every batch."""

    kind: str
    source: Optional[str]
    urls: tuple[str, ...]  # per row group
    groups: tuple[int, ...]  # row-group index in its file
    rows: tuple[int, ...]  # rows of this stream in each row group
    share: float
    holdout: float = 0.0  # the fraction of rows (by id hash) held out for validation
    side: Optional[str] = None  # "train" or "validation" of that split; None: every row
    vocab_size: int = 0  # token ids must be in [0, vocab_size) (0: the dataset declares no tokenizer)
    dataset: Optional[str] = None  # its dataset's name when train.data lists several
    id_prefix: str = ""  # prepended to its rows' ids (the dataset's name when there are several)

    def keeps(self, row: dict[str, Any]) -> bool:
        """Whether a row of its row groups belongs to this stream (its source, its side of the split)."""
        if self.source is not None and row["source"] != self.source:
            return False
        return self.side is None or (held_out(row["id"], self.holdout) == (self.side == "validation"))

    @property
    def name(self) -> str:
        kind = self.kind if self.dataset is None else f"{self.kind}[{self.dataset}]"
        return kind if self.source is None else f"{kind}/{self.source}"

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def held_out(sample_id: str, fraction: float) -> bool:
    """The validation side of a hold-out split: a fixed fraction of ids, by hash."""
    bucket = int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8, person=b"mmae-val").digest(), "little")
    return bucket < fraction * 2**64


@contextlib.contextmanager
def reading_shard(url: str) -> Iterator[pq.ParquetFile]:
    """A shard opened for reading; any failure to read it inside the block is one DataError naming it."""
    try:
        with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
            yield parquet
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{url}: cannot read shard ({type(error).__name__}: {str(error)[:300]}); `mmae validate` "
                        "lists every problem of the dataset") from None


def _open_parquet(url: str) -> pq.ParquetFile:
    return pq.ParquetFile(fsspec.open(url, "rb").open())


# ------------------------------------------------------------------------------------------
# One slot's view of one stream: an endless sequence of rows, epoch after epoch.


@dataclass(frozen=True)
class RowGroupPart:
    """Rows [part::parts] of one of a stream's row groups: what one slot reads of it in an epoch."""

    index: int  # row group index within the stream
    part: int
    parts: int
    rows: int


class SlotStream:
    """The rows of `stream` that global slot `slot` (of `slots`) reads, in order, forever."""

    def __init__(self, stream: Stream, seed: int, slot: int, slots: int, window: int, reader: "RowGroupReader") -> None:
        if stream.total_rows < slots:
            raise DataError(f"{stream.name} has {stream.total_rows} rows, fewer than the {slots} "
                            "ranks x slots that share it")
        self.stream, self.seed, self.slot, self.slots, self.window = stream, seed, slot, slots, window
        self.reader = reader
        self.epoch = 0
        self.epoch_start = 0  # global position where self.epoch begins
        self._plan = self._epoch_plan(0)
        self._loaded: dict[int, list[dict[str, Any]]] = {}  # chunk number -> rows
        self._window_index = -1
        self._window_start = 0
        self._order: list[int] = []

    def _epoch_plan(self, epoch: int) -> tuple[list[RowGroupPart], list[int]]:
        stream = self.stream
        order = list(range(len(stream.rows)))
        random.Random(seed_of(self.seed, stream.name, epoch)).shuffle(order)
        parts = 1 if len(order) >= self.slots else math.ceil(self.slots / len(order))
        every = [RowGroupPart(index, part, parts, len(range(part, stream.rows[index], parts)))
                 for index in order for part in range(parts)]
        mine = [chunk for chunk in every[self.slot::self.slots] if chunk.rows > 0]
        ends = []
        total = 0
        for chunk in mine:
            total += chunk.rows
            ends.append(total)
        return mine, ends

    def _length(self) -> int:
        ends = self._plan[1]
        return ends[-1] if ends else 0

    def _advance_epoch(self) -> None:
        self.epoch_start += self._length()
        self.epoch += 1
        self._plan = self._epoch_plan(self.epoch)
        self._loaded.clear()
        self._window_index = -1

    def _seek(self, position: int) -> int:
        """Move to the epoch containing global `position`; return the offset inside it."""
        if position < self.epoch_start:  # rewinding (rare): start over
            self.epoch, self.epoch_start = 0, 0
            self._plan = self._epoch_plan(0)
            self._loaded.clear()
            self._window_index = -1
        empty_epochs = 0
        while position >= self.epoch_start + self._length():
            empty_epochs = empty_epochs + 1 if self._length() == 0 else 0
            if empty_epochs > 1000:
                raise DataError(f"{self.stream.name}: slot {self.slot} never receives rows")
            self._advance_epoch()
        return position - self.epoch_start

    def _row(self, offset: int) -> dict[str, Any]:
        window_index = offset // self.window
        if window_index != self._window_index:
            self._enter_window(window_index)
        target = self._window_start + self._order[offset - self._window_start]
        ends = self._plan[1]
        number = bisect.bisect_right(ends, target)
        start = ends[number - 1] if number else 0
        return self._chunk_rows(number)[target - start]

    def _enter_window(self, window_index: int) -> None:
        """Fix this window's permutation; keep only the chunks it needs; read ahead the next's."""
        start = window_index * self.window
        length = min(self.window, self._length() - start)
        self._order = list(range(length))
        random.Random(seed_of(self.seed, self.stream.name, self.epoch, self.slot, window_index)).shuffle(self._order)
        self._window_start = start
        needed = self._chunks_between(start, start + length)
        for number in list(self._loaded):
            if number not in needed:
                del self._loaded[number]
        chunks = self._plan[0]
        for number in sorted(self._chunks_between(start + length, start + length + self.window) - needed):
            self.reader.prefetch(self.stream, chunks[number])
        self._window_index = window_index

    def _chunks_between(self, begin: int, end: int) -> set[int]:
        ends = self._plan[1]
        if begin >= end or not ends:
            return set()
        first = bisect.bisect_right(ends, begin)
        last = bisect.bisect_right(ends, end - 1)
        return set(range(first, min(last, len(ends) - 1) + 1))

    def _chunk_rows(self, number: int) -> list[dict[str, Any]]:
        if number not in self._loaded:
            self._loaded[number] = self.reader.read(self.stream, self._plan[0][number])
        return self._loaded[number]

    def take(self, position: int, count: int) -> list[tuple[dict[str, Any], int]]:
        """Rows at global positions [position, position + count), each with its epoch."""
        out = []
        for current in range(position, position + count):
            offset = self._seek(current)
            out.append((self._row(offset), self.epoch))
        return out


class RowGroupReader:
    """Reads row groups (projected columns) with a small read-ahead pool; per worker process."""

    def __init__(self, skip_errors: bool = False, read_ahead: int = 2) -> None:
        self.skip_errors = skip_errors
        self._files: dict[str, pq.ParquetFile] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix="mmae-read")
        self._pending: dict[tuple, Any] = {}

    def _read_now(self, stream: Stream, chunk: RowGroupPart) -> list[dict[str, Any]]:
        url, group = stream.urls[chunk.index], stream.groups[chunk.index]
        with self._guard:
            lock = self._locks.setdefault(url, threading.Lock())
        try:
            with lock:  # a ParquetFile is not safe to read from two threads at once
                parquet = self._files.get(url)
                if parquet is None:
                    parquet = self._files[url] = _open_parquet(url)
                table = parquet.read_row_group(group, columns=COLUMNS[stream.kind])
            check_token_range(table, stream.vocab_size)
        except (OSError, pa.ArrowException, BadData) as error:
            message = f"{url}: cannot read row group {group} ({type(error).__name__}: {error})"
            if not self.skip_errors:
                raise DataError(message) from None
            # Placeholders keep every later position where it was: the plan (and so resume) is unchanged.
            log.warning("skipping %d rows (train.data_errors: skip): %s", chunk.rows, message)
            return [None] * chunk.rows
        rows = table.to_pylist()
        if stream.id_prefix:
            for row in rows:
                row["id"] = stream.id_prefix + row["id"]
        if stream.source is not None or stream.side is not None:
            rows = [row for row in rows if stream.keeps(row)]
        return rows[chunk.part::chunk.parts]

    def prefetch(self, stream: Stream, chunk: RowGroupPart) -> None:
        key = (stream.name, chunk)
        if key not in self._pending and len(self._pending) < 8:
            self._pending[key] = self._pool.submit(self._read_now, stream, chunk)

    def read(self, stream: Stream, chunk: RowGroupPart) -> list[dict[str, Any]]:
        pending = self._pending.pop((stream.name, chunk), None)
        return pending.result() if pending is not None else self._read_now(stream, chunk)
