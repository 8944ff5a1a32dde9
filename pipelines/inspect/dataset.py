"""Opening a built dataset (local path or fsspec URL): manifest, shard URLs, polars scans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import fsspec
import polars as pl
import pyarrow.parquet as pq
from ..shards import join
from mmae.schemas.manifest import Manifest, ManifestError, read_manifest

# Protocols polars reads natively (and lazily); anything else goes through fsspec.
POLARS_NATIVE = ("file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "hf")


DatasetError = ManifestError  # the dataset cannot be opened (no manifest, unreadable manifest)


@dataclass
class Dataset:
    root: str
    manifest: Manifest

    @classmethod
    def open(cls, root: str) -> "Dataset":
        return cls(root=root, manifest=read_manifest(root))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.root)[0]

    def url(self, relative: str) -> str:
        return join(self.root, relative)

    def shard_urls(self, kind: Optional[str] = None) -> list[str]:
        return [self.url(entry.path) for entry in self.manifest.entries(*([kind] if kind else []))]

    def reject_urls(self) -> list[str]:
        return [self.url(entry.path) for entry in self.manifest.rejects]

    @property
    def max_tokens(self) -> Optional[int]:
        return self.manifest.max_tokens

    def first_damaged(self) -> Optional[str]:
        """The first listed shard or rejects file whose footer does not read, as `path: why`."""
        for entry in [*self.manifest.shards, *self.manifest.rejects]:
            url = self.url(entry.path)
            try:
                with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
                    parquet.metadata
            except Exception as error:  # noqa: BLE001 - any failure to read it names it
                return f"{url}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        return None

    def tokenizer_model(self) -> Optional[bytes]:
        entry = self.manifest.tokenizer
        if not entry:
            return None
        with fsspec.open(self.url(entry.path), "rb") as handle:
            return handle.read()


def scan(urls: list[str], columns: list[str]) -> pl.LazyFrame:
    """A lazy frame over the given Parquet files, reading only `columns`."""
    if not urls:
        return pl.LazyFrame()
    protocol = fsspec.core.split_protocol(urls[0])[0] or "file"
    if protocol in POLARS_NATIVE:
        return pl.scan_parquet(urls).select(columns)
    frames = []
    for url in urls:  # e.g. memory://: read each file's projected columns through fsspec
        with fsspec.open(url, "rb") as handle:
            frames.append(pl.read_parquet(handle, columns=columns).lazy())
    return pl.concat(frames, how="vertical_relaxed")


def column_bytes(url: str, column: str) -> tuple[int, int]:
    """(uncompressed bytes of one column, rows) from the Parquet footer alone."""
    with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
        metadata = parquet.metadata
    index = metadata.schema.to_arrow_schema().get_field_index(column)
    total = 0
    for group in range(metadata.num_row_groups):
        total += metadata.row_group(group).column(index).total_uncompressed_size
    return total, metadata.num_rows
