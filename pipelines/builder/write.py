"""`WriteShards` and `WriteRejects`: the final Parquet files.

Kept rows are laid out per kind in input order and cut into shards of exactly
`shards.rows_per_shard` rows (the last one shorter). Only *positions* travel through the
pipeline: per chunk, the sorted indices of its kept rows; a prefix sum over the chunks' counts
places each chunk in its kind's sequence. A shard writer then streams through the few
consecutive staging files its rows live in, one row group at a time, tokenizes captions and
writes the shard to a temporary name that is renamed when complete. Memory per writer is one
staging row group plus one output row group, whatever the dataset's size.

Rejects are small metadata rows: they are hash-partitioned by id and sorted inside each file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
import uuid
from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.builder import staging
from pipelines.builder.download import Candidate, candidate_position
from pipelines.builder.plan import ChunkKey
from pipelines.builder.tokenizer import Tokenizer
from pipelines.shards import join, shard_name, write_shard
from schemas.config import DataConfig
from schemas.shard import SHARD_SCHEMA

log = logging.getLogger("mmae.build")

ChunkRows = tuple[str, ChunkKey, list[int]]  # (kind, chunk, sorted indices of kept rows)


def chunk_and_index(candidate: Candidate, kinds: list[str]) -> tuple[tuple[str, ChunkKey], int]:
    source_index, file_number, chunk_number, index = candidate_position(candidate)
    return (kinds[source_index], (source_index, file_number, chunk_number)), index


def sorted_indices(element: tuple[tuple[str, ChunkKey], Iterable[int]]) -> ChunkRows:
    (kind, chunk), indices = element
    return kind, chunk, sorted(indices)


def chunk_count(chunk_rows: ChunkRows) -> tuple[str, ChunkKey, int]:
    kind, chunk, indices = chunk_rows
    return kind, chunk, len(indices)


class _Layout:
    """Where each chunk's kept rows start in its kind's sequence, and how many shards each kind has."""

    def __init__(self, counts: Iterable[tuple[str, ChunkKey, int]], rows_per_shard: int) -> None:
        self.start: dict[tuple[str, ChunkKey], int] = {}
        totals: dict[str, int] = {}
        for kind, chunk, count in sorted(counts):
            self.start[(kind, chunk)] = totals.get(kind, 0)
            totals[kind] = totals.get(kind, 0) + count
        self.shards = {kind: max(1, math.ceil(total / rows_per_shard)) for kind, total in totals.items()}


class SplitIntoShardsFn(beam.DoFn):
    """(kind, chunk, indices) -> ((kind, shard, shard count), (chunk, indices in that shard))."""

    def __init__(self, rows_per_shard: int) -> None:
        self.rows_per_shard = rows_per_shard
        self._layout: Optional[_Layout] = None
        self._layout_id: Optional[tuple[int, int]] = None

    def process(self, element: ChunkRows, counts: list) -> Iterator[Any]:
        # The side input is the same for every element: build the prefix sums once per worker.
        identity = (len(counts), sum(count for _, _, count in counts))
        if self._layout is None or identity != self._layout_id:
            self._layout = _Layout(counts, self.rows_per_shard)
            self._layout_id = identity
        kind, chunk, indices = element
        position = self._layout.start[(kind, chunk)]
        count = self._layout.shards[kind]
        taken = 0
        while taken < len(indices):
            shard = (position + taken) // self.rows_per_shard
            room = (shard + 1) * self.rows_per_shard - (position + taken)
            piece = indices[taken : taken + room]
            yield (kind, shard, count), (chunk, piece)
            taken += len(piece)


class _HashingFile:
    """A write-only file object that hashes what passes through (the manifest's sha256)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        self.digest.update(data)
        self.size += len(data)
        self.handle.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class WriteShardFn(beam.DoFn):
    """One final shard from the staging files its rows live in."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self._tokenizer: Optional[Tokenizer] = None
        self._model: Optional[bytes] = None

    def _tokenizer_for(self, model: bytes) -> Optional[Tokenizer]:
        """Loaded once per worker (per model), looked up once per shard."""
        if not model:
            return None
        if model is not self._model and model != self._model:
            self._tokenizer = Tokenizer(model, self.config.text.max_tokens)
            self._model = model
        return self._tokenizer

    def process(self, element, model: bytes) -> Iterator[dict[str, Any]]:
        (kind, shard, count), pieces = element
        pieces = sorted(pieces)
        relative = posixpath.join(kind, shard_name(shard, count))
        target = join(self.config.output, relative)
        fs, path = fsspec.core.url_to_fs(target)
        folder, name = posixpath.split(path)
        fs.makedirs(folder, exist_ok=True)
        temporary = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
        group_size = self.config.shards.rows_per_row_group
        rows = 0
        sources: dict[str, int] = {}
        tokenizer = self._tokenizer_for(model)
        with fs.open(temporary, "wb") as handle:
            sink = _HashingFile(handle)
            with pq.ParquetWriter(
                sink,
                SHARD_SCHEMA,
                compression={name: ("none" if name == "image" else "zstd") for name in SHARD_SCHEMA.names},
                use_dictionary=["source", "kind", "image_format", "label"],
                write_statistics=["id"],
            ) as writer:
                # Arrow tables all the way: image bytes are never turned into Python objects.
                pending: list[pa.Table] = []
                pending_rows = 0
                for chunk, indices in pieces:
                    url = staging.chunk_url(self.config.output, self.config.sources[chunk[0]].name, chunk)
                    for table in staging.read_tables(url, indices):
                        captions = table.column("caption").to_pylist()
                        tokens = pa.array(
                            [None if caption is None or tokenizer is None else tokenizer.encode(caption)
                             for caption in captions], pa.list_(pa.int32()))
                        columns = [tokens if name == "tokens" else table.column(name) for name in SHARD_SCHEMA.names]
                        pending.append(pa.Table.from_arrays(columns, schema=SHARD_SCHEMA))
                        pending_rows += table.num_rows
                        for source in table.column("source").to_pylist():
                            sources[source] = sources.get(source, 0) + 1
                        if pending_rows >= group_size:
                            merged = pa.concat_tables(pending)
                            full = pending_rows - pending_rows % group_size
                            writer.write_table(merged.slice(0, full), row_group_size=group_size)
                            rows += full
                            pending = [merged.slice(full)]
                            pending_rows -= full
                if pending_rows:
                    writer.write_table(pa.concat_tables(pending), row_group_size=group_size)
                    rows += pending_rows
        fs.mv(temporary, path)
        log.info("wrote %s (%d rows, %.1f MB)", relative, rows, sink.size / 1e6)
        yield {"path": relative, "kind": kind, "rows": rows, "bytes": sink.size,
               "sha256": sink.digest.hexdigest(), "sources": dict(sorted(sources.items()))}


class WriteShards(beam.PTransform):
    """Kept candidates (where each row is staged) + tokenizer model -> shard manifest entries."""

    def __init__(self, config: DataConfig, model) -> None:
        super().__init__()
        self.config = config
        self.model = model

    def expand(self, candidates):
        per_chunk = (
            candidates
            | "ChunkIndex" >> beam.Map(chunk_and_index, [source.kind for source in self.config.sources])
            | "GroupByChunk" >> beam.GroupByKey()
            | "SortIndices" >> beam.Map(sorted_indices)
        )
        counts = per_chunk | "Count" >> beam.Map(chunk_count)
        return (
            per_chunk
            | "Split" >> beam.ParDo(SplitIntoShardsFn(self.config.shards.rows_per_shard), beam.pvalue.AsList(counts))
            | "GroupByShard" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteShardFn(self.config), beam.pvalue.AsSingleton(self.model))
        )


# --------------------------------------------------------------------------------------------
# Rejects


def _shard_index(row_id: str, count: int) -> int:
    return int(row_id[:12], 16) % count


def assign_reject_shard(record: dict[str, Any], total: int, rows_per_shard: int) -> tuple:
    count = max(1, math.ceil(total / rows_per_shard))
    return (_shard_index(record["id"], count), count), record


class WriteRejectGroupFn(beam.DoFn):
    def __init__(self, output: str, rows_per_row_group: int) -> None:
        self.output = output
        self.rows_per_row_group = rows_per_row_group

    def process(self, element) -> Iterator[dict[str, Any]]:
        (index, count), rows = element
        yield write_shard(self.output, "rejects", index, count, rows, self.rows_per_row_group)


class WriteRejects(beam.PTransform):
    """Reject rows -> hash-partitioned files of ~rows_per_shard rows, sorted by id inside each."""

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, rejects):
        total = rejects | "Total" >> beam.combiners.Count.Globally()
        return (
            rejects
            | "Assign" >> beam.Map(
                assign_reject_shard, beam.pvalue.AsSingleton(total), self.config.shards.rows_per_shard)
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteRejectGroupFn(self.config.output, self.config.shards.rows_per_row_group))
        )
