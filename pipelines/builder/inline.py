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
from .fetch import FetchError, FetchResult

# The image column is read in windows of WINDOW_ROWS rows, WINDOWS_KEPT kept per process: a
# chunk's rows are consecutive and fetched roughly in order, so a forward reader per row group
# serves them, and memory follows these numbers, not the file's row-group size.
WINDOW_ROWS = 32
WINDOWS_KEPT = 8


class InlineImages:
    """Reads the image a locator points to. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._starts: dict[str, list[int]] = {}  # parquet path -> first row of each row group
        self._windows: "OrderedDict[tuple[str, str, int, int], pa.Array]" = OrderedDict()
        self._readers: dict[tuple[str, str, int], tuple[Any, Any, int]] = {}  # -> (handle, batches, next window)

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
        with self._lock:  # one reader at a time per process: windows are shared
            starts = self._starts.get(path)
            if starts is None:
                with fsspec.open(path, "rb") as handle, pq.ParquetFile(handle) as parquet:
                    counts = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
                starts = self._starts[path] = [sum(counts[:g]) for g in range(len(counts))]
            group = bisect.bisect_right(starts, row) - 1
            offset = row - starts[group]
            key = (path, column, group, offset // WINDOW_ROWS)
            values = self._windows.get(key)
            if values is None:
                values = self._read_window(path, column, group, offset // WINDOW_ROWS)
            self._windows.move_to_end(key)
            value = values[offset % WINDOW_ROWS].as_py()
        if isinstance(value, dict):
            value = value.get("bytes")
        if not value:
            raise FetchError("missing_column", f"no image bytes in {column!r}")
        return value

    def _read_window(self, path: str, column: str, group: int, window: int) -> pa.Array:
        """Read forward through the row group to `window` (restarting when it lies behind)."""
        reader_key = (path, column, group)
        reader = self._readers.get(reader_key)
        if reader is None or reader[2] > window:
            self._close_reader(reader_key)
            handle = fsspec.open(path, "rb").open()
            parquet = pq.ParquetFile(handle, buffer_size=1 << 20, pre_buffer=False)
            reader = (handle, parquet.iter_batches(batch_size=WINDOW_ROWS, row_groups=[group], columns=[column]), 0)
        handle, batches, position = reader
        try:
            while True:
                batch = next(batches, None)
                if batch is None:
                    raise FetchError("not_found", f"{path}: row group {group} has fewer rows than its metadata says")
                values = batch.column(0)
                self._windows[(path, column, group, position)] = values
                while len(self._windows) > WINDOWS_KEPT:
                    self._windows.popitem(last=False)
                position += 1
                if position > window:
                    break
        except BaseException:
            self._readers[reader_key] = (handle, batches, position)
            self._close_reader(reader_key)
            raise
        self._readers[reader_key] = (handle, batches, position)
        while len(self._readers) > WINDOWS_KEPT:
            self._close_reader(next(iter(self._readers)))
        return values

    def _close_reader(self, key: tuple[str, str, int]) -> None:
        reader = self._readers.pop(key, None)
        if reader is not None:
            reader[0].close()
