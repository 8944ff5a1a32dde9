"""Parquet tables: rows in batches, a page at a time; an inline image column never becomes
Python objects here (the reader only notes which rows have bytes). A damaged row group is one
`bad_row` reject per row, naming the group, and the next group is read."""

from __future__ import annotations

from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from .rows import error_text, record_from_row
from ..records import new_record, reject
from ..sources import SourceFile, required_columns
from ..tablefiles import open_parquet
from mmae.schemas.config import SourceConfig


def read_parquet(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    columns = required_columns(source)
    image_column = source.image_column
    with fsspec.open(source_file.path, "rb") as handle, open_parquet(handle) as parquet:
        row_number = 0
        for group in range(parquet.metadata.num_row_groups):
            group_rows = parquet.metadata.row_group(group).num_rows
            first = row_number
            try:
                # With the images in the file, batches are small and the image column never
                # becomes Python objects: the reader only needs to know which rows have bytes.
                for batch in parquet.iter_batches(batch_size=256 if image_column else 4096, row_groups=[group],
                                                  columns=columns):
                    present = image_present(batch.column(image_column)) if image_column else None
                    rows = batch.drop_columns([image_column]).to_pylist() if image_column else batch.to_pylist()
                    for index, row in enumerate(rows):
                        row_number += 1
                        if present is not None:
                            row[image_column] = b"\x01" if present[index] else None
                        yield record_from_row(source, source_file, f"{source_file.relative}:{row_number}", row,
                                               f"row {row_number}")
            except Exception as error:  # noqa: BLE001 - a damaged row group (or a value Python cannot hold)
                # Its unread rows are rejects naming it; the next one is read.
                for row_number in range(row_number + 1, first + group_rows + 1):
                    yield reject(new_record(source.name, source.kind, f"{source_file.relative}:{row_number}"), "bad_row",
                                 f"row group {group}: {error_text(error)}")
                row_number = first + group_rows


def image_present(column: pa.Array) -> list[bool]:
    """Per row: does the image column hold some bytes?"""
    if pa.types.is_struct(column.type):
        valid = pc.is_valid(column)
        column = pc.struct_field(column, "bytes")
        valid = pc.and_(valid, pc.is_valid(column))
    else:
        valid = pc.is_valid(column)
    nonempty = pc.fill_null(pc.greater(pc.binary_length(column), 0), False)
    return pc.and_(pc.fill_null(valid, False), nonempty).to_pylist()
