"""The format readers: each streams one source file's rows as records (or rejects), and no row,
however hostile, raises. `read_source_file` picks the reader by the file's format."""

from __future__ import annotations

from typing import Any, Iterator, Optional

from ..lines import Span
from .folders import read_image_file
from .parquet import read_parquet
from .tables import read_csv, read_jsonl, read_txt
from .tars import read_tar
from ..sources import SourceFile
from mmae.schemas.config import SourceConfig


def read_source_file(source: SourceConfig, source_file: SourceFile, cap: int = 1 << 20,
                     span: Optional[Span] = None) -> Iterator[dict[str, Any]]:
    """Stream one file's rows as records (or rejects). Keys are `relative:row` (1-based rows:
    the line for JSONL, the row among non-blank lines for CSV/TSV), `relative#sample` for
    WebDataset tars, the file's path for image folders. No row, however hostile, raises: it
    becomes a reject naming its line. `span`: only that piece of a line table (`lines.Span`)."""
    if source_file.format == "image":
        yield from read_image_file(source, source_file)
        return
    if source_file.format == "tar":
        yield from read_tar(source, source_file)
        return
    if source_file.format == "jsonl":
        yield from read_jsonl(source, source_file, cap, span)
    elif source_file.format == "txt":
        yield from read_txt(source, source_file, cap, span)
    elif source_file.format == "parquet":
        yield from read_parquet(source, source_file)
    else:
        yield from read_csv(source, source_file, cap, span)
