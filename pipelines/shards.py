"""Writing Parquet shards (schema v1) atomically through fsspec, plus JSON outputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import uuid
from typing import Any, Iterable, Iterator

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq
from mmae.schemas.shard import REJECT_SCHEMA, SHARD_SCHEMA


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def shard_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.parquet"


@contextlib.contextmanager
def temporary_beside(url: str) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """(file system, a temporary path next to `url`'s target): what the block writes there is
    renamed onto the target when the block ends, so no half file ever has the real name. The one
    atomic write of mmae's outputs (shards, staging files, JSON, the tokenizer)."""
    fs, path = fsspec.core.url_to_fs(url)
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    temporary = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    yield fs, temporary
    fs.mv(temporary, path)


def write_atomic(url: str, data: bytes) -> None:
    with temporary_beside(url) as (fs, temporary), fs.open(temporary, "wb") as handle:
        handle.write(data)


def write_json(url: str, payload: Any) -> None:
    write_atomic(url, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; a missing key is null, extra keys are ignored) as a table, column by column."""
    return pa.Table.from_arrays([pa.array([row.get(field.name) for row in rows], type=field.type) for field in schema],
                                schema=schema)


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How every mmae Parquet file is written: image bytes stored uncompressed (already
    JPEG/WebP), other columns zstd, dictionaries for the low-cardinality columns, id statistics."""
    return {
        "compression": {name: ("none" if name == "image" else "zstd") for name in schema.names},
        "use_dictionary": [name for name in ("source", "kind", "image_format", "label", "reason") if name in schema.names],
        "write_statistics": ["id"] if "id" in schema.names else False,
    }


def table_bytes(rows: list[dict[str, Any]], schema: pa.Schema, rows_per_row_group: int) -> bytes:
    """Serialize rows to Parquet (see `parquet_options`)."""
    table = rows_table(rows, schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=rows_per_row_group, **parquet_options(schema))
    return sink.getvalue().to_pybytes()


def write_table_atomic(url: str, table: pa.Table, rows_per_row_group: int) -> None:
    """Write a table as Parquet to a temporary name next to the target, then rename. A local
    file is written by Arrow itself (no copy through Python bytes, without the GIL)."""
    options = {"row_group_size": rows_per_row_group, **parquet_options(table.schema)}
    with temporary_beside(url) as (fs, temporary):
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            pq.write_table(table, temporary, **options)
        else:
            with fs.open(temporary, "wb") as handle:
                pq.write_table(table, handle, **options)


def write_shard(
    root: str, folder: str, index: int, count: int, rows: Iterable[dict[str, Any]], rows_per_row_group: int
) -> dict[str, Any]:
    """Write one shard (rows sorted by id for determinism); return its manifest entry."""
    schema = REJECT_SCHEMA if folder == "rejects" else SHARD_SCHEMA
    ordered = sorted(rows, key=lambda row: row["id"])
    data = table_bytes(ordered, schema, rows_per_row_group)
    relative = posixpath.join(folder, shard_name(index, count))
    write_atomic(join(root, relative), data)
    return {
        "path": relative,
        "kind": folder,
        "rows": len(ordered),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
