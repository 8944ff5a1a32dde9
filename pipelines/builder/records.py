"""What crosses the build's stages, by name: the typed keys and summaries, and the one place
rows and rejects are made.

A *row* (a record) is a plain dict, cheap to pickle, with at least `id`, `source`, `kind` and
`key`; a *reject* is a row with a `reason` (machine-readable) and a `detail` (for people). Every
stage makes them with `new_record`, `reject`, `failed` and `kept` below, so a reason is set one way.

The keys and summaries are NamedTuples: positional like the tuples Beam's coders expect (and
deterministic as group keys), read by field name everywhere.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from mmae.schemas.shard import reject_detail


class Order(NamedTuple):
    """Where a record stood in the input; decides its chunk and which of two copies is kept."""

    source: int  # index of its source in data.sources
    file: int  # number of its file among the source's files
    row: int  # 1-based row number in the file (0: not a numbered row)


class ChunkKey(NamedTuple):
    """A chunk: a run of `chunk_rows` consecutive input rows of one file (the unit of resume)."""

    source: int
    file: int
    chunk: int


class FileRef(NamedTuple):
    number: int  # among its source's files
    file: Any  # sources.SourceFile
    skip: int = 0  # rows numbered up to this are already in the dataset (`mmae build --append`)
    span: Any = None  # lines.Span: only this piece of the file (a big uncompressed table)


class ReadUnit(NamedTuple):
    """What one reader is given: consecutive files of one source (one table file, or a chunk's
    worth of an image folder's files)."""

    source: int
    files: list[FileRef]


class ChunkRows(NamedTuple):
    """A chunk the reader staged, and how many input rows it holds."""

    chunk: ChunkKey
    rows: int


class ChunkSummary(NamedTuple):
    """What the download stage reports per chunk (never per row)."""

    chunk: ChunkKey
    rows: int  # input rows of the chunk
    stored: int  # rows stored with their image or text (the rest are rejects)


class KeyFile(NamedTuple):
    """Where one bucket's packed entries of one chunk lie in a staged key file (`dedup.spill`)."""

    url: str
    offset: int
    length: int


class Packed(NamedTuple):
    """One chunk's dedup hashes of one bucket, packed (see dedup.pack), or where they are staged."""

    chunk: ChunkKey
    what: str  # what is compared: url | text | image | near-duplicate | near-duplicate image
    entries: "bytes | KeyFile"


class ChunkCount(NamedTuple):
    """How many rows of one chunk land in one output sequence (a kind, or the rejects)."""

    sequence: str  # paired | image | text | rejects
    chunk: ChunkKey
    rows: int


class Piece(NamedTuple):
    """Rows [start, stop) of one chunk's rows in one sequence: a slice of one output shard."""

    chunk: ChunkKey
    start: int
    stop: int


class ShardKey(NamedTuple):
    """One output file: shard `shard` of `count` in a sequence."""

    sequence: str
    shard: int
    count: int


def row_id(source_name: str, key: str) -> str:
    """Stable id: a hash of the source name and the row's key within the source."""
    return hashlib.blake2b(f"{source_name}\x00{key}".encode(), digest_size=10).hexdigest()


def new_record(source_name: str, kind: str, key: str) -> dict[str, Any]:
    return {"id": row_id(source_name, key), "source": source_name, "kind": kind, "key": key}


class RowProblem(ValueError):
    """One row cannot be used: it becomes a reject with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def reject(record: dict[str, Any], reason: str, detail: str = "") -> dict[str, Any]:
    """A record refused before anything was fetched for it: only what a rejects row holds (a
    caption that cannot be stored, a lone surrogate, goes no further)."""
    url = record.get("url")
    return {"id": record["id"], "source": record["source"], "kind": record["kind"], "key": record["key"],
            "url": url if isinstance(url, str) else None, "reason": reason, "detail": reject_detail(detail)}


def failed(record: dict[str, Any], reason: str, detail: str = "") -> dict[str, Any]:
    """A record whose fetch or decode failed: its fields stay beside the reason (the staging file
    keeps them, so `--retry-transient` can try the row again)."""
    return {**record, "reason": reason, "detail": reject_detail(detail)}


def kept(record: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The record with what a stage added, marked as kept (`reason` None)."""
    return {**record, **fields, "reason": None}


def is_reject(record: dict[str, Any]) -> bool:
    """Rejected at any stage (a record the reader kept has no `reason` yet; a kept one has None)."""
    return record.get("reason") is not None
