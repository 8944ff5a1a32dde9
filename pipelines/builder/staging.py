"""The staging area: per chunk, its input rows `OUT/staging/inputs/SOURCE/FFFFF-CCCCCC.jsonl.gz`
(written by the reader, so records never cross a shuffle) and, once finished, one committed
Parquet file `OUT/staging/chunks/SOURCE/FFFFF-CCCCCC.parquet`.

A chunk file holds every row that reached the download stage for that chunk, in input order:
rows that succeeded (with their image bytes) and rows that failed (with `reason`/`detail`,
and the caption/label they had, so a later retry can redo them). It is written to a temporary
name and renamed, so its presence means the chunk is done; a resumed build never fetches it
again. Only the final shard writer reads the image bytes back, streaming one row group at a time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from typing import Any, Iterable, Iterator, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from .plan import chunk_name
from .records import ChunkKey
from ..shards import join, rows_table, write_atomic, write_table_atomic
from mmae.schemas.shard import SHARD_SCHEMA

STAGING = "staging"
IDS_KEY = b"mmae.chunk_records"
ROW_GROUP = 64  # the unit the shard writer reads back

STAGING_SCHEMA = pa.schema(
    [field for field in SHARD_SCHEMA if field.name != "tokens"]
    + [
        pa.field("key", pa.string()),
        pa.field("reason", pa.string()),  # null: the row succeeded
        pa.field("detail", pa.string()),
        # neardup.image_hashes: every variant's hash, for the band keys (image_phash is the first)
        pa.field("image_phashes", pa.list_(pa.uint64())),
    ]
)
META_COLUMNS = [name for name in STAGING_SCHEMA.names if name != "image"]


def chunk_url(output: str, source_name: str, key: ChunkKey) -> str:
    return join(output, STAGING, "chunks", source_name, chunk_name(key) + ".parquet")


def keys_url(output: str, source_name: str, key: ChunkKey, what: str) -> str:
    """A chunk's near-duplicate keys of one kind (`dedup.HashPacker.spill`)."""
    return join(output, STAGING, "keys", what, source_name, chunk_name(key) + ".bin")


def input_url(output: str, source_name: str, key: ChunkKey) -> str:
    return join(output, STAGING, "inputs", source_name, chunk_name(key) + ".jsonl.gz")


def write_input(url: str, records: list[dict[str, Any]]) -> None:
    """A chunk's input records (rejects from reading/cleaning included), in input order. JSON with
    ASCII escapes keeps any Python string, lone surrogates included."""
    text = "".join(json.dumps(record, ensure_ascii=True, sort_keys=True) + "\n" for record in records)
    write_atomic(url, gzip.compress(text.encode("ascii"), compresslevel=1, mtime=0))


def read_input(url: str) -> list[dict[str, Any]]:
    with fsspec.open(url, "rb") as handle:
        return [json.loads(line) for line in gzip.decompress(handle.read()).splitlines()]


def records_digest(records: Iterable[dict[str, Any]]) -> str:
    """Which input rows a chunk holds, and what they say: a resumed build reuses a committed chunk
    only if its rows are the same (an edited URL or caption on a line redoes that chunk)."""
    digest = hashlib.blake2b(digest_size=16)
    for record in records:
        for name in ("id", "url", "caption", "label"):
            value = record.get(name)
            digest.update(b"\x00" if value is None else value.encode("utf-8", "surrogatepass") + b"\x01")
    return digest.hexdigest()


PART_SCHEMA = STAGING_SCHEMA.append(pa.field("index", pa.int32()))


def part_table(rows: Iterable[tuple[int, dict[str, Any]]]) -> pa.Table:
    """Finished rows of a chunk and their positions in it: what part files and the chunk file
    are made of. Each row is converted to Arrow once; committing a chunk joins these tables."""
    pairs = list(rows)
    table = rows_table([row for _, row in pairs], STAGING_SCHEMA)
    return table.append_column(PART_SCHEMA.field("index"), pa.array([index for index, _ in pairs], pa.int32()))


def write_chunk(url: str, parts: list[pa.Table], count: int, digest: str) -> None:
    """Commit a chunk: its rows (`part_table`s, in any order) in input order, under the digest
    of its input rows. Every position 0..count-1 must be there exactly once."""
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    table = table.take(pc.sort_indices(table["index"]))
    if not np.array_equal(table["index"].to_numpy(), np.arange(count)):
        raise ValueError(f"{url}: rows to commit are not positions 0..{count - 1} once each")
    table = table.drop_columns(["index"]).replace_schema_metadata({IDS_KEY: digest.encode()})
    write_table_atomic(url, table, ROW_GROUP)


def part_url(chunk_url: str, number: int) -> str:
    return f"{chunk_url.removesuffix('.parquet')}.part-{number:04d}.parquet"


def write_part(url: str, table: pa.Table, digest: str) -> None:
    """Finished rows of a chunk that is still waiting on others (saved so a kill loses little)."""
    write_table_atomic(url, table.replace_schema_metadata({IDS_KEY: digest.encode()}), ROW_GROUP)


def list_parts(folder: str) -> dict[str, list[str]]:
    """chunk URL -> its part files, for one source's chunk folder."""
    fs, path = fsspec.core.url_to_fs(folder)
    try:
        names = fs.ls(path, detail=False)
    except (FileNotFoundError, OSError):
        return {}
    parts: dict[str, list[str]] = {}
    for name in sorted(names):
        base = name.rsplit("/", 1)[-1]
        if ".part-" in base and base.endswith(".parquet") and not base.startswith(".tmp-"):
            chunk = join(folder, base.split(".part-", 1)[0] + ".parquet")
            parts.setdefault(chunk, []).append(join(folder, base))
    return parts


def read_parts(urls: list[str], expected_digest: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, row with image bytes) from part files written for these very rows; others are skipped."""
    for url in urls:
        try:
            with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
                metadata = parquet.schema_arrow.metadata or {}
                if metadata.get(IDS_KEY, b"").decode() != expected_digest:
                    continue
                rows = parquet.read().to_pylist()
        except (OSError, pa.ArrowException):
            continue  # a damaged part is fetched again
        for row in rows:
            yield row.pop("index"), row


def remove_parts(urls: list[str]) -> None:
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass


def read_chunk(url: str, expected_digest: Optional[str] = None) -> Optional[list[dict[str, Any]]]:
    """A committed chunk's rows without image bytes; None if absent, unreadable or for other rows."""
    try:
        with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
            metadata = parquet.schema_arrow.metadata or {}
            if expected_digest is not None and metadata.get(IDS_KEY, b"").decode() != expected_digest:
                return None
            return parquet.read(columns=META_COLUMNS).to_pylist()
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException):
        return None  # a damaged file is redone, not trusted


def read_reasons(url: str) -> list[Optional[str]]:
    """A committed chunk's `reason` column: None for the rows that were stored."""
    with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
        return parquet.read(columns=["reason"]).column("reason").to_pylist()


def read_tables(url: str, indices: list[int], columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
    """The rows at `indices` (ascending) of a chunk file (image bytes included unless `columns`
    leaves them out), one row group at a time."""
    with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
        metadata = parquet.metadata
        start = 0
        position = 0
        for group in range(metadata.num_row_groups):
            size = metadata.row_group(group).num_rows
            wanted = []
            while position < len(indices) and indices[position] < start + size:
                wanted.append(indices[position] - start)
                position += 1
            if wanted:
                yield parquet.read_row_group(group, columns=columns).take(pa.array(wanted, pa.int64()))
            start += size
            if position == len(indices):
                return
    if position != len(indices):
        raise ValueError(f"{url}: {len(indices) - position} row(s) past its end")


def read_rows(url: str, indices: list[int]) -> Iterator[dict[str, Any]]:
    for table in read_tables(url, indices):
        yield from table.to_pylist()
