"""Reading input corpora: expand each source to files, stream its rows as records.

A record is a plain dict (picklable, cheap) with at least `id`, `source`, `kind`, `key`.
Rows that cannot be used at all (bad JSON, missing column, invalid UTF-8) are emitted as
records carrying a `reason`, so they end in `rejects/` and are counted, never dropped.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator, Optional
from urllib.parse import urljoin, urlsplit

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from schemas.config import SourceConfig

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FETCHABLE_SCHEMES = ("http", "https")


# The tagged output every stage routes its rejects to (rows built by `reject` below).
REJECTED = "rejected"


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, missing column): fails before any work."""


def row_id(source_name: str, key: str) -> str:
    """Stable id: a hash of the source name and the row's key within the source."""
    return hashlib.blake2b(f"{source_name}\x00{key}".encode(), digest_size=10).hexdigest()


def _format_of(path: str) -> str:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in TABLE_SUFFIXES:
        if name.endswith(suffix):
            return "jsonl" if suffix == ".json" else suffix[1:]
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    raise SourceError(f"{path}: unknown file type (expected one of {', '.join(TABLE_SUFFIXES)}, optionally .gz)")


@dataclass(frozen=True)
class SourceFile:
    """One file of a source, with the key prefix that keeps ids stable across machines."""

    path: str  # fsspec URL or local path
    relative: str  # path relative to the source root: the key prefix
    format: str  # jsonl | parquet | csv | tsv | image


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def expand_source(source: SourceConfig) -> list[SourceFile]:
    """List a source's files; raise SourceError naming the path when there are none."""
    fs, root = fsspec.core.url_to_fs(source.path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol

    def to_url(path: str) -> str:
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    if _has_glob(source.path):
        matches = sorted(fs.glob(root))
        base = root[: min((root.find(ch) for ch in "*?[" if ch in root))]
        base = base.rsplit("/", 1)[0]
        files = [m for m in matches if not fs.isdir(m)]
        if not files:
            raise SourceError(f"source {source.name!r}: no files match {source.path}")
    elif fs.isdir(root):
        if source.kind != "image":
            raise SourceError(
                f"source {source.name!r}: {source.path} is a folder; only kind: image sources read folders"
            )
        base = root.rstrip("/")
        files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise SourceError(f"source {source.name!r}: no image files under {source.path}")
    elif fs.exists(root):
        base = root.rsplit("/", 1)[0]
        files = [root]
    else:
        raise SourceError(f"source {source.name!r}: {source.path} does not exist")

    out = []
    for path in files:
        relative = posixpath.relpath(path, base) if base else path
        fmt = _format_of(path)
        if fmt == "image" and source.kind != "image":
            raise SourceError(f"source {source.name!r}: {path} is an image; only kind: image sources list images")
        out.append(SourceFile(path=to_url(path), relative=relative, format=fmt))
    for source_file in out:
        if source_file.format in ("parquet", "csv", "tsv"):
            _check_columns(source, source_file)
    return out


def required_columns(source: SourceConfig) -> list[str]:
    if source.kind == "paired":
        columns = [source.url_column, source.caption_column]
    elif source.kind == "image":
        columns = [source.url_column]
    else:
        columns = [source.text_column]
    if source.label_column:
        columns.append(source.label_column)
    return columns


def _check_columns(source: SourceConfig, source_file: SourceFile) -> None:
    """Columnar files declare their columns up front: a missing one is a config error, not N rejects."""
    with fsspec.open(source_file.path, "rb", compression="infer") as handle:
        if source_file.format == "parquet":
            with pq.ParquetFile(handle) as parquet:
                names = parquet.schema_arrow.names
        else:
            delimiter = "\t" if source_file.format == "tsv" else ","
            header = handle.readline().decode("utf-8", errors="replace").rstrip("\r\n")
            names = [name.strip().strip('"') for name in header.split(delimiter)]
    missing = [column for column in required_columns(source) if column not in names]
    if missing:
        raise SourceError(
            f"source {source.name!r}: {source_file.path} has no column(s) {', '.join(missing)} "
            f"(columns: {', '.join(names)})"
        )


def resolve_url(url: str, source: SourceConfig, source_file: SourceFile) -> str:
    """Absolute URLs pass through; relative ones join base_url, else the source file's folder."""
    if urlsplit(url).scheme and len(urlsplit(url).scheme) > 1:  # one letter: a Windows drive
        return url
    if source.base_url:
        base = source.base_url if source.base_url.endswith("/") else source.base_url + "/"
        return urljoin(base, url)
    folder = source_file.path.rsplit("/", 1)[0] if "/" in source_file.path else "."
    return posixpath.normpath(posixpath.join(folder, url)) if "://" not in folder else f"{folder}/{url}"


def _decode(value: Any) -> Optional[str]:
    """Values come as str, bytes (binary columns) or other scalars; bytes must be valid UTF-8."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError is handled by the caller
    return value if isinstance(value, str) else str(value)


def _base_record(source: SourceConfig, key: str) -> dict[str, Any]:
    return {"id": row_id(source.name, key), "source": source.name, "kind": source.kind, "key": key}


def reject(record: dict[str, Any], reason: str, detail: str = "") -> dict[str, Any]:
    """Turn a record into a reject (keeps id/source/kind/key/url)."""
    return {
        "id": record["id"],
        "source": record["source"],
        "kind": record["kind"],
        "key": record["key"],
        "url": record.get("url"),
        "reason": reason,
        "detail": detail[:500],
    }


def _record_from_row(
    source: SourceConfig, source_file: SourceFile, key: str, row: dict[str, Any]
) -> dict[str, Any]:
    record = _base_record(source, key)
    try:
        if source.kind in ("paired", "image"):
            url = _decode(row.get(source.url_column))
            if url is None or not url.strip():
                return reject(record, "missing_column", f"no {source.url_column!r} value")
            record["url"] = resolve_url(url.strip(), source, source_file)
        if source.kind == "paired":
            caption = _decode(row.get(source.caption_column))
            if caption is None:
                return reject(record, "missing_column", f"no {source.caption_column!r} value")
            record["caption"] = caption
        if source.kind == "text":
            text = _decode(row.get(source.text_column))
            if text is None:
                return reject(record, "missing_column", f"no {source.text_column!r} value")
            record["caption"] = text
        if source.label_column:
            record["label"] = _decode(row.get(source.label_column))
    except UnicodeDecodeError as error:
        return reject(record, "invalid_utf8", str(error))
    return record


def read_source_file(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    """Stream one file's rows as records (or rejects). Keys are `relative:row` (1-based rows)."""
    if source_file.format == "image":
        record = _base_record(source, source_file.relative)
        record["url"] = source_file.path
        yield record
        return
    if source_file.format == "jsonl":
        yield from _read_jsonl(source, source_file)
    elif source_file.format == "parquet":
        yield from _read_parquet(source, source_file)
    else:
        yield from _read_csv(source, source_file)


def _read_jsonl(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    with fsspec.open(source_file.path, "rb", compression="infer") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue  # blank lines are not rows
            key = f"{source_file.relative}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                yield reject(_base_record(source, key), "invalid_utf8", f"line {line_number}: {error}")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield reject(_base_record(source, key), "bad_row", f"line {line_number}: {error}")
                continue
            if not isinstance(row, dict):
                yield reject(_base_record(source, key), "bad_row", f"line {line_number}: not a JSON object")
                continue
            yield _record_from_row(source, source_file, key, row)


def _read_parquet(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    columns = required_columns(source)
    with fsspec.open(source_file.path, "rb") as handle, pq.ParquetFile(handle) as parquet:
        row_number = 0
        for batch in parquet.iter_batches(batch_size=4096, columns=columns):
            for row in batch.to_pylist():
                row_number += 1
                yield _record_from_row(source, source_file, f"{source_file.relative}:{row_number}", row)


def open_csv(handle, source_file: SourceFile, columns: list[str], on_invalid_row) -> pacsv.CSVStreamingReader:
    """A streaming CSV/TSV reader of `columns`, the same for the planner's count and the reader,
    so both see the same rows. Columns are binary: invalid UTF-8 becomes a per-row reject
    instead of failing the file; `on_invalid_row` is told of each malformed row."""
    return pacsv.open_csv(
        handle,
        parse_options=pacsv.ParseOptions(
            delimiter="\t" if source_file.format == "tsv" else ",",
            invalid_row_handler=on_invalid_row,
            newlines_in_values=True,
        ),
        convert_options=pacsv.ConvertOptions(include_columns=columns, column_types={name: pa.binary() for name in columns}),
        read_options=pacsv.ReadOptions(block_size=1 << 22),
    )


def _read_csv(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    columns = required_columns(source)
    bad_rows: list[tuple[int, str]] = []

    def on_invalid_row(row: pacsv.InvalidRow) -> str:
        bad_rows.append((row.number or 0, f"expected {row.expected_columns} columns, got {row.actual_columns}"))
        return "skip"

    with fsspec.open(source_file.path, "rb", compression="infer") as handle:
        reader = open_csv(handle, source_file, columns, on_invalid_row)
        row_number = 0
        for batch in reader:
            for row in batch.to_pylist():
                row_number += 1
                yield _record_from_row(source, source_file, f"{source_file.relative}:{row_number}", row)
    # Malformed rows come last, each with a key of its own (the parser does not always know its line).
    for count, (number, detail) in enumerate(bad_rows, start=1):
        key = f"{source_file.relative}:bad-row-{count}"
        where = f"line {number}: " if number and number > 0 else ""
        yield reject(_base_record(source, key), "bad_row", f"{where}{detail}")
