"""Reading the layout of table files, without reading their rows: Parquet opened a page at a
time, CSV/TSV headers as people write them, which column types hold an image."""

from __future__ import annotations

import csv

import pyarrow as pa
import pyarrow.parquet as pq


class HeaderError(ValueError):
    """A header that cannot name the columns (a column given twice)."""


def open_parquet(handle) -> pq.ParquetFile:
    """A Parquet file read a page at a time (buffered), so memory follows the batch size, not
    the size of the file's row groups."""
    return pq.ParquetFile(handle, buffer_size=1 << 20, pre_buffer=False)


def image_column_type_ok(data_type: pa.DataType) -> bool:
    if pa.types.is_struct(data_type):
        return data_type.get_field_index("bytes") >= 0 and image_column_type_ok(data_type.field("bytes").type)
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)


def read_header(handle, source_file) -> list[str]:
    """Column names as people write them: a byte-order mark, spaces after the delimiter and
    quotes are not part of a name (`url, caption` names `caption`)."""
    line = handle.readline(1 << 20).decode("utf-8-sig", errors="replace")
    names = [name.strip() for name in next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter(source_file),
                                                      skipinitialspace=True), [])]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise HeaderError(f"{source_file.path}: the header repeats column(s) {', '.join(repeated)}")
    return names


def delimiter(source_file) -> str:
    return "\t" if source_file.format == "tsv" else ","
