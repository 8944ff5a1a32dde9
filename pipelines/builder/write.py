"""`WriteShards`: the final Parquet files, kept rows per kind and rejects.

Each kind's kept rows, and all rejects, are laid out in input order and cut into files of
exactly `shards.rows_per_shard` rows (the last one shorter). Only *counts* travel through the
pipeline: per chunk, how many of its rows are kept (stored, not an image duplicate) and how
many are rejects; a prefix sum over the chunks places each chunk in its sequence, and each
shard is given `(chunk, start, stop)` pieces. A shard writer reads a chunk's `reason` column
and image duplicates to know which rows its piece means, then streams them from the staging
file one row group at a time, tokenizes captions and writes the shard to a temporary name that
is renamed when complete. Memory per writer is one staging row group plus one output row group,
whatever the dataset's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from . import staging
from .dedup import duplicates_of
from .neardup import reason_of
from .memory import release_freed_memory
from .records import ChunkCount, ChunkKey, ChunkSummary, Piece, ShardKey, failed
from .tokenizer import Tokenizer
from ..shards import join, parquet_options, shard_name, table_bytes, temporary_beside, write_atomic
from mmae.schemas.config import DataConfig
from mmae.schemas.shard import REJECT_SCHEMA, SHARD_SCHEMA

log = logging.getLogger("mmae.build")

REJECTS = "rejects"


class ChunkCountsFn(beam.DoFn):
    """`ChunkSummary` -> its kept rows (in its kind's sequence) and its rejects."""

    def __init__(self, config: DataConfig) -> None:
        self.kinds = [source.kind for source in config.sources]

    def process(self, summary: ChunkSummary, image_duplicates) -> Iterator[ChunkCount]:
        chunk = summary.chunk
        copies = len(duplicates_of(image_duplicates, chunk))
        if summary.stored - copies:
            yield ChunkCount(self.kinds[chunk.source], chunk, summary.stored - copies)
        if summary.rows - summary.stored + copies:
            yield ChunkCount(REJECTS, chunk, summary.rows - summary.stored + copies)


class _Layout:
    """Where each chunk's rows start in their sequence, and how many shards each sequence has."""

    def __init__(self, counts: Iterable[ChunkCount], rows_per_shard: int) -> None:
        self.start: dict[tuple[str, ChunkKey], int] = {}
        totals: dict[str, int] = {}
        for count in sorted(counts):
            self.start[(count.sequence, count.chunk)] = totals.get(count.sequence, 0)
            totals[count.sequence] = totals.get(count.sequence, 0) + count.rows
        self.shards = {group: max(1, math.ceil(total / rows_per_shard)) for group, total in totals.items()}


class SplitIntoShardsFn(beam.DoFn):
    """ChunkCount -> (ShardKey, Piece): which shards of its sequence a chunk's rows fall in."""

    def __init__(self, rows_per_shard: int) -> None:
        self.rows_per_shard = rows_per_shard
        self._layout: Optional[_Layout] = None
        self._layout_id: Optional[tuple[int, int]] = None

    def process(self, element: ChunkCount, counts: list) -> Iterator[Any]:
        # The side input is the same for every element: build the prefix sums once per worker.
        identity = (len(counts), sum(count.rows for count in counts))
        if self._layout is None or identity != self._layout_id:
            self._layout = _Layout(counts, self.rows_per_shard)
            self._layout_id = identity
        position = self._layout.start[(element.sequence, element.chunk)]
        shards = self._layout.shards[element.sequence]
        taken = 0
        while taken < element.rows:
            shard = (position + taken) // self.rows_per_shard
            room = (shard + 1) * self.rows_per_shard - (position + taken)
            piece = min(room, element.rows - taken)
            yield ShardKey(element.sequence, shard, shards), Piece(element.chunk, taken, taken + piece)
            taken += piece


def _is_rejects(element: tuple[ShardKey, Any], _count: int) -> int:
    shard, _ = element
    return 1 if shard.sequence == REJECTS else 0


def piece_indices(config: DataConfig, piece: Piece, image_duplicates, rejects: bool) -> tuple[str, list[int], dict[int, str]]:
    """(staging URL, the indices a piece means, that chunk's image duplicates)."""
    url = staging.chunk_url(config.output, config.sources[piece.chunk.source].name, piece.chunk)
    copies = duplicates_of(image_duplicates, piece.chunk)
    reasons = staging.read_reasons(url)
    if rejects:
        selected = [index for index, reason in enumerate(reasons) if reason is not None or index in copies]
    else:
        selected = [index for index, reason in enumerate(reasons) if reason is None and index not in copies]
    if piece.stop > len(selected):
        raise ValueError(f"{url}: {len(selected)} rows selected, the layout expects {piece.stop}")
    return url, selected[piece.start:piece.stop], copies


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


CONTENT_COLUMNS = ("id", "source", "caption", "tokens", "image_sha256", "label")


def _hash_content(digest, table: pa.Table) -> None:
    """The manifest's `content_sha256`: what the trainer reads, row by row, and not where the
    bytes were fetched from (the url column), so a rebuild from a mirror or another port is the
    same dataset to a resumed run."""
    for row in zip(*(table.column(name).to_pylist() for name in CONTENT_COLUMNS)):
        digest.update(json.dumps(row, separators=(",", ":")).encode() + b"\n")


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

    def process(self, element, model: bytes, image_duplicates) -> Iterator[dict[str, Any]]:
        key, pieces = element
        pieces = sorted(pieces)
        kind = key.sequence
        relative = posixpath.join(kind, shard_name(key.shard, key.count))
        group_size = self.config.shards.rows_per_row_group
        rows = 0
        sources: dict[str, int] = {}
        tokenizer = self._tokenizer_for(model)
        content = hashlib.sha256()
        with temporary_beside(join(self.config.output, relative)) as (fs, temporary), \
                fs.open(temporary, "wb") as handle:
            sink = _HashingFile(handle)
            with pq.ParquetWriter(sink, SHARD_SCHEMA, **parquet_options(SHARD_SCHEMA)) as writer:
                # Arrow tables all the way: image bytes are never turned into Python objects.
                pending: list[pa.Table] = []
                pending_rows = 0
                for piece in pieces:
                    url, indices, _ = piece_indices(self.config, piece, image_duplicates, rejects=False)
                    for table in staging.read_tables(url, indices):
                        captions = table.column("caption").to_pylist()
                        tokens = pa.array(
                            [None if caption is None or tokenizer is None else tokenizer.encode(caption)
                             for caption in captions], pa.list_(pa.int32()))
                        columns = [tokens if name == "tokens" else table.column(name) for name in SHARD_SCHEMA.names]
                        pending.append(pa.Table.from_arrays(columns, schema=SHARD_SCHEMA))
                        _hash_content(content, pending[-1])
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
        release_freed_memory()
        log.info("wrote %s (%d rows, %.1f MB)", relative, rows, sink.size / 1e6)
        yield {"path": relative, "kind": kind, "rows": rows, "bytes": sink.size,
               "sha256": sink.digest.hexdigest(), "content_sha256": content.hexdigest(),
               "sources": dict(sorted(sources.items()))}


class WriteRejectShardFn(beam.DoFn):
    """One rejects file, in input order: the staged rows with a reason, and the image duplicates."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config

    def process(self, element, image_duplicates) -> Iterator[dict[str, Any]]:
        key, pieces = element
        rows: list[dict[str, Any]] = []
        for piece in sorted(pieces):
            url, indices, copies = piece_indices(self.config, piece, image_duplicates, rejects=True)
            for table in staging.read_tables(url, indices, columns=REJECT_SCHEMA.names):
                rows.extend(table.to_pylist())
            first = len(rows) - len(indices)
            for offset, index in enumerate(indices):
                if index in copies:  # a later copy of a stored image: a reject like any other
                    rows[first + offset] = failed(rows[first + offset], reason_of(copies[index]), copies[index])
        reasons: dict[str, dict[str, int]] = {}
        for row in rows:
            per_source = reasons.setdefault(row["source"], {})
            per_source[row["reason"]] = per_source.get(row["reason"], 0) + 1
        data = table_bytes(rows, REJECT_SCHEMA, self.config.shards.rows_per_row_group)
        relative = posixpath.join(REJECTS, shard_name(key.shard, key.count))
        write_atomic(join(self.config.output, relative), data)
        yield {"path": relative, "kind": REJECTS, "rows": len(rows), "bytes": len(data),
               "sha256": hashlib.sha256(data).hexdigest(), "reasons": reasons}


class WriteShards(beam.PTransform):
    """Chunk summaries + image duplicates + tokenizer model -> manifest entries of the kept
    rows' shards (main) and of the rejects files (`rejects`)."""

    def __init__(self, config: DataConfig, image_duplicates, model) -> None:
        super().__init__()
        self.config = config
        self.image_duplicates = image_duplicates
        self.model = model

    def expand(self, summaries):
        duplicates = beam.pvalue.AsMultiMap(self.image_duplicates)
        counts = summaries | "Count" >> beam.ParDo(ChunkCountsFn(self.config), duplicates)
        shards, rejects = (
            counts
            | "Split" >> beam.ParDo(SplitIntoShardsFn(self.config.shards.rows_per_shard), beam.pvalue.AsList(counts))
            | "GroupByShard" >> beam.GroupByKey()
            | "KeptOrRejects" >> beam.Partition(_is_rejects, 2)
        )
        written = shards | "Write" >> beam.ParDo(
            WriteShardFn(self.config), beam.pvalue.AsSingleton(self.model), beam.pvalue.AsMultiMap(self.image_duplicates))
        rejected = rejects | "WriteRejects" >> beam.ParDo(
            WriteRejectShardFn(self.config), beam.pvalue.AsMultiMap(self.image_duplicates))
        return {"shards": written, REJECTS: rejected}
