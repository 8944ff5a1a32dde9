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
- `ChunkReader` reads row groups (projected columns) with a small read-ahead pool.
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
from mmae.schemas.config import DatasetEntry, TrainConfig
from mmae.schemas.manifest import Manifest, ShardEntry, TokenizerEntry, read_manifest
from mmae.schemas.shard import SCHEMA_VERSION, SHARD_SCHEMA
from mmae.trainer.batch import KINDS

log = logging.getLogger("mmae.data")

_OTHER_SIDE = object()  # a row on the other side of the hold-out split

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


class TokenizerMismatch(DataError):
    """Datasets (or a checkpoint and a dataset) that do not share one tokenizer."""


@dataclass(frozen=True)
class DataPlan:
    """What `build_streams` found: the streams, the data's fingerprint (what a checkpoint keeps),
    the shards that could not be opened, and each shard's content key (to say what changed)."""

    streams: list[Stream]
    fingerprint: str
    skipped: list[str]
    shards: list[tuple[str, str, str]]  # (dataset path, shard path, content key)


def shard_key(entry: ShardEntry) -> str:
    """What identifies a shard's rows: the hash of what the trainer reads (ids, captions, image
    hashes, labels) where the build recorded it, else the file's bytes (older builds). A rebuild
    from another mirror or port keeps the first and changes the second (the url column)."""
    return str(getattr(entry, "content_sha256", None) or entry.sha256)


def tokenizer_of(paths: list[str], manifests: Optional[list[Manifest]] = None) -> Optional[TokenizerEntry]:
    """The one tokenizer the datasets share (datasets without one, image-only builds, agree with any);
    TokenizerMismatch naming two that differ and the fix."""
    manifests = manifests if manifests is not None else [read_manifest(path) for path in paths]
    found: Optional[tuple[str, TokenizerEntry]] = None
    for path, manifest in zip(paths, manifests):
        if manifest.tokenizer is None:
            continue
        if found is None:
            found = (path, manifest.tokenizer)
        elif manifest.tokenizer.sha256 != found[1].sha256:
            raise TokenizerMismatch(
                f"{found[0]} and {path} were built with different tokenizers ({found[1].sha256[:12]} vs "
                f"{manifest.tokenizer.sha256[:12]}): their token ids mean different words. Rebuild {path} with "
                f"--set data.tokenizer.model={found[0]} (a dataset folder or its tokenizer.model) so both share one")
    return found[1] if found else None


def build_streams(config: TrainConfig, split: str = "train") -> DataPlan:
    """Read the manifests and the footer of every shard a positive share needs.

    `split`: "train" reads train.data less its held-out rows (`train.validation.holdout`);
    "validation" reads those held-out rows, or `train.validation.data` when that is set.
    Several datasets in train.data: each kind's share is split between them by weight x rows,
    and inside one dataset between its sources by `source_weights` (by size when unset); their
    rows' ids are prefixed with the dataset's name, so ids stay unique.
    """
    validation = config.validation
    if split == "validation" and validation.data:
        datasets = [DatasetEntry(path=validation.data, name=None)]
        holdout = 0.0
    else:
        datasets = config.datasets
        holdout = validation.holdout
    several = len(datasets) > 1
    side = split if holdout > 0 else None
    manifests = [read_manifest(entry.path) for entry in datasets]
    tokenizer = tokenizer_of([entry.path for entry in datasets], manifests)
    vocab_size = tokenizer.vocab_size if tokenizer else 0
    known: dict[str, str] = {}
    for manifest in manifests:
        known.update(manifest.source_kinds())
    unknown = sorted(set(config.source_weights) - set(known))
    if unknown:
        where = " or ".join(entry.path for entry in datasets)
        raise DataError(f"train.source_weights names {', '.join(unknown)}, not a source of {where} (its sources: "
                        f"{', '.join(sorted(known)) or 'none recorded'})")
    shares = config.mix.shares()
    streams: list[Stream] = []
    skipped: list[str] = []
    shard_keys: list[tuple[str, str, str]] = []
    fingerprint = hashlib.sha256()
    for kind in KINDS:
        if shares[kind] <= 0:
            continue  # never read, not even opened
        found = []  # per dataset: (entry, {source: (urls, groups, rows)})
        for entry, manifest in zip(datasets, manifests):
            if several:
                fingerprint.update(f"dataset:{entry.name}:{entry.weight!r}".encode())
            prefix = f"{entry.name}:" if several else ""
            split_by_source = any(name in config.source_weights for name, of in manifest.source_kinds().items()
                                  if of == kind)
            per_source = _row_groups(config, entry.path, manifest, kind, split_by_source, side, holdout, prefix,
                                     fingerprint, skipped, shard_keys)
            if per_source:
                found.append((entry, prefix, per_source))
        sizes = [entry.weight * sum(sum(rows) for _, _, rows in per_source.values())
                 for entry, _, per_source in found]
        for (entry, prefix, per_source), size in zip(found, sizes):
            if size <= 0:
                continue
            dataset_share = shares[kind] * size / sum(sizes)
            weights = {name: (config.source_weights.get(name, 1.0) if name is not None else 1.0) for name in per_source}
            weight_sum = sum(weights.values())
            for name in sorted(per_source, key=lambda value: value or ""):
                if weights[name] <= 0:
                    continue
                urls, groups, rows = per_source[name]
                streams.append(Stream(kind, name, tuple(urls), tuple(groups), tuple(rows),
                                      dataset_share * weights[name] / weight_sum, holdout, side, vocab_size,
                                      dataset=entry.name if several else None, id_prefix=prefix))
        if not any(stream.kind == kind for stream in streams):
            which = f" on the {side} side of train.validation.holdout" if side else ""
            where = " or ".join(entry.path for entry in datasets)
            raise DataError(f"{where}: train.mix.{kind} is {shares[kind]:.3f} but there are no {kind} rows{which} "
                            "to read")
    if skipped:
        log.warning("%d shard(s) skipped (train.data_errors: skip): %s", len(skipped), ", ".join(skipped))
    return DataPlan(streams, fingerprint.hexdigest()[:16], skipped, shard_keys)


def _row_groups(config: TrainConfig, data: str, manifest: Manifest, kind: str, split_by_source: bool,
                side: Optional[str], holdout: float, prefix: str, fingerprint, skipped: list[str],
                shard_keys: list[tuple[str, str, str]]) -> dict[Optional[str], tuple[list, list, list]]:
    """One dataset's row groups of `kind`, per source (or all under None), with their row counts."""
    root = data.rstrip("/")
    per_source: dict[Optional[str], tuple[list, list, list]] = {}
    for entry in manifest.entries(kind):
        if not entry.rows:
            continue
        url = f"{root}/{entry.path}"
        key = shard_key(entry)
        fingerprint.update(key.encode())
        shard_keys.append((data, entry.path, key))
        try:
            with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
                metadata = parquet.metadata
                check_columns(parquet.schema_arrow, COLUMNS[kind])
                sources = None
                if split_by_source or side:
                    table = parquet.read(columns=["id", "source"])
                    names = table.column("source").to_pylist() if split_by_source else [None] * table.num_rows
                    if side:  # rows on the other side of the split count for nothing here
                        wanted = side == "validation"
                        names = [name if held_out(prefix + sample, holdout) == wanted else _OTHER_SIDE
                                 for name, sample in zip(names, table.column("id").to_pylist())]
                    sources = names
        except (OSError, pa.ArrowException, ValueError) as error:
            if config.data_errors == "skip":
                skipped.append(url)
                # The plan then differs from one with this shard: a checkpoint made with it
                # cannot be resumed without it (the fingerprint says so).
                fingerprint.update(b"skipped:" + url.encode())
                log.warning("skipping unreadable shard %s: its %d rows are not in this run's plan (%s)",
                            url, entry.rows, error)
                continue
            raise DataError(f"{url}: cannot open shard ({type(error).__name__}: {error})") from None
        start = 0
        for group in range(metadata.num_row_groups):
            size = metadata.row_group(group).num_rows
            if sources is None:
                counts = {None: size}
            else:
                counts = {}
                for name in sources[start:start + size]:
                    counts[name] = counts.get(name, 0) + 1
            start += size
            for name, count in counts.items():
                if name is _OTHER_SIDE:
                    continue
                urls, groups, rows = per_source.setdefault(name, ([], [], []))
                urls.append(url)
                groups.append(group)
                rows.append(count)
    return per_source


# ------------------------------------------------------------------------------------------
# One slot's view of one stream: an endless sequence of rows, epoch after epoch.


@dataclass(frozen=True)
class Chunk:
    index: int  # row group index within the stream
    part: int  # rows [part::parts] of that row group
    parts: int
    rows: int


class SlotStream:
    """The rows of `stream` that global slot `slot` (of `slots`) reads, in order, forever."""

    def __init__(self, stream: Stream, seed: int, slot: int, slots: int, window: int, reader: "ChunkReader") -> None:
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

    def _epoch_plan(self, epoch: int) -> tuple[list[Chunk], list[int]]:
        stream = self.stream
        order = list(range(len(stream.rows)))
        random.Random(seed_of(self.seed, stream.name, epoch)).shuffle(order)
        parts = 1 if len(order) >= self.slots else math.ceil(self.slots / len(order))
        every = [Chunk(index, part, parts, len(range(part, stream.rows[index], parts)))
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


class ChunkReader:
    """Reads row groups (projected columns) with a small read-ahead pool; per worker process."""

    def __init__(self, skip_errors: bool = False, read_ahead: int = 2) -> None:
        self.skip_errors = skip_errors
        self._files: dict[str, pq.ParquetFile] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix="mmae-read")
        self._pending: dict[tuple, Any] = {}

    def _read_now(self, stream: Stream, chunk: Chunk) -> list[dict[str, Any]]:
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

    def prefetch(self, stream: Stream, chunk: Chunk) -> None:
        key = (stream.name, chunk)
        if key not in self._pending and len(self._pending) < 8:
            self._pending[key] = self._pool.submit(self._read_now, stream, chunk)

    def read(self, stream: Stream, chunk: Chunk) -> list[dict[str, Any]]:
        pending = self._pending.pop((stream.name, chunk), None)
        return pending.result() if pending is not None else self._read_now(stream, chunk)
