"""Writing Parquet shards (schema v1) atomically through fsspec, plus JSON outputs."""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from typing import Any, Iterable

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq
from mmae.schemas.shard import REJECT_SCHEMA, SHARD_SCHEMA


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def shard_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.parquet"


def write_atomic(url: str, data: bytes) -> None:
    """Write to a temporary name next to the target, then rename: no half file under the real name."""
    fs, path = fsspec.core.url_to_fs(url)
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    temporary = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    with fs.open(temporary, "wb") as handle:
        handle.write(data)
    fs.mv(temporary, path)


def write_json(url: str, payload: Any) -> None:
    write_atomic(url, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; a missing key is null, extra keys are ignored) as a table, column by column."""
    return pa.Table.from_arrays([pa.array([row.get(field.name) for row in rows], type=field.type) for field in schema],
                                schema=schema)


def _parquet_options(schema: pa.Schema, rows_per_row_group: int) -> dict[str, Any]:
    """Image bytes stored uncompressed (already JPEG/WebP), other columns zstd."""
    return {
        "row_group_size": rows_per_row_group,
        "compression": {name: ("none" if name == "image" else "zstd") for name in schema.names},
        "use_dictionary": [name for name in ("source", "kind", "image_format", "label", "reason") if name in schema.names],
        "write_statistics": ["id"] if "id" in schema.names else False,
    }


def table_bytes(rows: list[dict[str, Any]], schema: pa.Schema, rows_per_row_group: int) -> bytes:
    """Serialize rows to Parquet (see `_parquet_options`)."""
    table = rows_table(rows, schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **_parquet_options(schema, rows_per_row_group))
    return sink.getvalue().to_pybytes()


def write_table_atomic(url: str, table: pa.Table, rows_per_row_group: int) -> None:
    """Write a table as Parquet to a temporary name next to the target, then rename. A local
    file is written by Arrow itself (no copy through Python bytes, without the GIL)."""
    fs, path = fsspec.core.url_to_fs(url)
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    temporary = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    options = _parquet_options(table.schema, rows_per_row_group)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        pq.write_table(table, temporary, **options)
    else:
        with fs.open(temporary, "wb") as handle:
            pq.write_table(table, handle, **options)
    fs.mv(temporary, path)


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
