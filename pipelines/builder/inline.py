"""Images that are already in the input: a WebDataset tar member, a Parquet image column, or
base64 text in JSONL/CSV. The reader leaves a `locator` in the record instead of a URL, and the
download stage reads the bytes here, with the same byte cap as a download and no network."""

from __future__ import annotations

import base64
import binascii
import bisect
import threading
from collections import OrderedDict
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from mmae.pipelines.builder.fetch import FetchError, FetchResult

ROW_GROUPS_KEPT = 4  # per process: the rows of a chunk are consecutive, so few are in use at once


class InlineImages:
    """Reads the image a locator points to. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._starts: dict[str, list[int]] = {}  # parquet path -> first row of each row group
        self._groups: "OrderedDict[tuple[str, str, int], pa.ChunkedArray]" = OrderedDict()

    def fetch(self, locator: dict[str, Any]) -> FetchResult:
        try:
            if "tar" in locator:
                data = self._tar_member(locator["tar"], locator["offset"], locator["size"])
            elif "parquet" in locator:
                data = self._parquet_cell(locator["parquet"], locator["column"], locator["row"])
            else:
                data = self._base64(locator["base64"])
        except FetchError:
            raise
        except (OSError, ValueError, pa.ArrowException) as error:
            raise FetchError("not_found", f"{type(error).__name__}: {error}") from None
        if len(data) > self.max_bytes:
            raise FetchError("too_large", f"{len(data)} bytes > {self.max_bytes}")
        return FetchResult(data=data)

    def _tar_member(self, path: str, offset: int, size: int) -> bytes:
        if size > self.max_bytes:
            raise FetchError("too_large", f"{size} bytes > {self.max_bytes}")
        with fsspec.open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise FetchError("decode_error", f"the tar member is cut ({len(data)} of {size} bytes)")
        return data

    def _base64(self, text: str) -> bytes:
        if len(text) > self.max_bytes * 4 // 3 + 4:
            raise FetchError("too_large", f"more than {self.max_bytes} bytes")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise FetchError("decode_error", f"the image column is not base64: {error}") from None

    def _parquet_cell(self, path: str, column: str, row: int) -> bytes:
        with self._lock:  # one reader at a time per process: row groups are shared
            starts = self._starts.get(path)
            if starts is None:
                with fsspec.open(path, "rb") as handle, pq.ParquetFile(handle) as parquet:
                    counts = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
                starts = self._starts[path] = [sum(counts[:g]) for g in range(len(counts))]
            group = bisect.bisect_right(starts, row) - 1
            key = (path, column, group)
            values = self._groups.get(key)
            if values is None:
                with fsspec.open(path, "rb") as handle, pq.ParquetFile(handle) as parquet:
                    values = parquet.read_row_group(group, columns=[column]).column(column)
                self._groups[key] = values
                while len(self._groups) > ROW_GROUPS_KEPT:
                    self._groups.popitem(last=False)
            else:
                self._groups.move_to_end(key)
            value = values[row - starts[group]].as_py()
        if isinstance(value, dict):
            value = value.get("bytes")
        if not value:
            raise FetchError("missing_column", f"no image bytes in {column!r}")
        return value
