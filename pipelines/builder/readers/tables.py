"""Line-based tables: JSONL (one object per line), plain text (one text per line) and CSV/TSV
(one row per line after the header). Lines are read bounded (`lines`): a line longer than the
cap is a `row_too_long` reject, skipped without being held. Keys are `relative:row`."""

from __future__ import annotations

import csv
import json
from typing import Any, Iterator, Optional

import fsspec
from ..lines import Span, lines
from .rows import error_text, record_from_row, too_long
from ..records import new_record, reject
from ..sources import SourceFile, required_columns
from ..tablefiles import delimiter, read_header
from mmae.schemas.config import SourceConfig


def _line_rows(source: SourceConfig, source_file: SourceFile, cap: int, row,
               span: Optional[Span] = None) -> Iterator[dict[str, Any]]:
    """One record per non-blank line (`row(key, line_number, raw_line)`); a line over the cap is
    `row_too_long` without being held. Keys are lines."""
    with fsspec.open(source_file.path, "rb", compression="infer") as handle:
        for line_number, raw_line in lines(handle, cap, span):
            key = f"{source_file.relative}:{line_number}"
            if raw_line is None:
                yield too_long(source, key, line_number, cap)
            elif raw_line.strip():  # blank lines are not rows
                yield row(key, line_number, raw_line)


def read_jsonl(source: SourceConfig, source_file: SourceFile, cap: int,
               span: Optional[Span] = None) -> Iterator[dict[str, Any]]:
    return _line_rows(source, source_file, cap,
                      lambda key, number, raw: jsonl_record(source, source_file, key, number, raw), span)


def read_txt(source: SourceConfig, source_file: SourceFile, cap: int,
             span: Optional[Span] = None) -> Iterator[dict[str, Any]]:
    """A plain text corpus: every non-blank line is one text (the most common format of text
    corpora)."""
    def text_row(key: str, line_number: int, raw_line: bytes) -> dict[str, Any]:
        record = new_record(source.name, source.kind, key)
        try:
            record["caption"] = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            return reject(record, "invalid_utf8", f"line {line_number}: {error}")
        return record

    return _line_rows(source, source_file, cap, text_row, span)


def jsonl_record(source: SourceConfig, source_file: SourceFile, key: str, line_number: int,
                  raw_line: bytes) -> dict[str, Any]:
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        return reject(new_record(source.name, source.kind, key), "invalid_utf8", f"line {line_number}: {error}")
    try:
        row = json.loads(line)
    except Exception as error:  # noqa: BLE001
        # JSONDecodeError, and what the parser raises on legal-looking input: nesting deeper
        # than the interpreter's stack (RecursionError), numbers too long to convert.
        return reject(new_record(source.name, source.kind, key), "bad_row", f"line {line_number}: {error_text(error)}")
    if not isinstance(row, dict):
        return reject(new_record(source.name, source.kind, key), "bad_row", f"line {line_number}: not a JSON object")
    return record_from_row(source, source_file, key, row, f"line {line_number}")


def csv_quoted(source: SourceConfig, source_file: SourceFile) -> bool:
    """Are quotes syntax in this file? (`quoting`; by default yes in CSV, no in TSV)."""
    if source.quoting is not None:
        return source.quoting == "standard"
    return source_file.format == "csv"


def read_csv(source: SourceConfig, source_file: SourceFile, cap: int,
             span: Optional[Span] = None) -> Iterator[dict[str, Any]]:
    """One row per non-blank line after the header: a quote never spans lines, so an unclosed
    one costs its own line (a bad_row), never the lines after it."""
    columns = required_columns(source)
    separator = delimiter(source_file)
    quoting = csv.QUOTE_MINIMAL if csv_quoted(source, source_file) else csv.QUOTE_NONE
    with fsspec.open(source_file.path, "rb", compression="infer") as handle:
        names = read_header(handle, source_file)
        where = {name: names.index(name) for name in columns}
        row_number = span.rows_before if span is not None else 0
        for line_number, raw_line in lines(handle, cap, span, header_lines=1):
            line_number += 1  # the header was line 1
            if raw_line is not None and not raw_line.strip():
                continue  # blank lines are not rows
            row_number += 1
            key = f"{source_file.relative}:{row_number}"
            if raw_line is None:
                yield too_long(source, key, line_number, cap)
                continue
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            try:
                fields = next(csv.reader([text if text is not None else raw_line.decode("utf-8", "surrogateescape")],
                                         delimiter=separator, quoting=quoting, strict=True))
            except csv.Error as error:
                yield reject(new_record(source.name, source.kind, key), "bad_row", f"line {line_number}: {error} (a quote that is "
                             "not closed on its line? TSV files from the web are read with quoting: none)")
                continue
            if len(fields) != len(names):
                yield reject(new_record(source.name, source.kind, key), "bad_row",
                             f"line {line_number}: expected {len(names)} columns, got {len(fields)}")
                continue
            row = {name: fields[index] for name, index in where.items()}
            if text is None and any(_has_surrogate(value) for value in row.values()):
                yield reject(new_record(source.name, source.kind, key), "invalid_utf8", f"line {line_number}: not valid UTF-8")
                continue
            yield record_from_row(source, source_file, key, row, f"line {line_number}")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
