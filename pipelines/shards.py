"""Writing Parquet shards (schema v1) atomically through fsspec, plus JSON outputs."""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from typing import Any, Iterable

import fsspec
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


def table_bytes(rows: list[dict[str, Any]], schema: pa.Schema, rows_per_row_group: int) -> bytes:
    """Serialize rows to Parquet: image bytes stored uncompressed (already JPEG/WebP), others zstd."""
    table = pa.Table.from_pylist(rows, schema=schema)
    compression = {name: ("none" if name == "image" else "zstd") for name in schema.names}
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=rows_per_row_group,
        compression=compression,
        use_dictionary=[name for name in ("source", "kind", "image_format", "label", "reason") if name in schema.names],
        write_statistics=["id"] if "id" in schema.names else False,
    )
    return sink.getvalue().to_pybytes()


def write_shard(
    root: str, folder: str, index: int, count: int, rows: Iterable[dict[str, Any]], rows_per_row_group: int
) -> dict[str, Any]:
    """Write one shard (rows sorted by id for determinism); return its manifest entry."""
    schema = REJECT_SCHEMA if folder == "rejects" else SHARD_SCHEMA
    ordered = sorted(rows, key=lambda row: row["id"])
    projected = [{name: row.get(name) for name in schema.names} for row in ordered]
    data = table_bytes(projected, schema, rows_per_row_group)
    relative = posixpath.join(folder, shard_name(index, count))
    write_atomic(join(root, relative), data)
    return {
        "path": relative,
        "kind": folder,
        "rows": len(projected),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
