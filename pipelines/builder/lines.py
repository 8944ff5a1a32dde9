"""Lines of a text table (JSONL, CSV, TSV) with memory bounded by a setting, not by the input.

A stranger's file can hold one line of hundreds of megabytes (a pasted blob, a gzip that
expands to a single line). `lines` never holds more than `cap` + 1 bytes of one line: a longer
line is skipped in pieces to its end and reported as too long. The planner counts rows with the
same function the reader reads them with, so both see the same rows.
"""

from __future__ import annotations

import math
from typing import BinaryIO, Iterator, NamedTuple, Optional

PIECE = 1 << 20  # bytes read at a time while skipping the rest of a too-long line


class Span(NamedTuple):
    """A run of whole chunks of an uncompressed table that one reader reads, so that the rows of
    one big file are read by every worker, not one (`rows_per_chunk` finds where they start)."""

    offset: int  # the byte its first line starts at
    lines_before: int  # lines of the file before it, the header included
    rows_before: int  # rows before it (non-blank lines after any header)
    end: int  # the byte the next span starts at; -1: the end of the file


def lines(handle: BinaryIO, cap: int, span: Optional[Span] = None, header_lines: int = 0) -> Iterator[tuple[int, Optional[bytes]]]:
    """(1-based line number, the line without its newline) per line; None for a line longer
    than `cap` bytes, which is consumed without being held. `span`: only its lines, numbered as
    in the whole file less `header_lines` (the caller has read those)."""
    number = 0
    end = -1
    if span is not None:
        handle.seek(span.offset)
        number, end = span.lines_before - header_lines, span.end
    while True:
        if end >= 0 and handle.tell() >= end:
            return
        line = handle.readline(cap + 1)
        if not line:
            return
        number += 1
        if len(line) > cap and not line.endswith(b"\n"):
            while True:  # the rest of the line, piece by piece
                rest = handle.readline(PIECE)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None
            continue
        yield number, line.rstrip(b"\r\n") if line.endswith(b"\n") else line


def is_blank(line: Optional[bytes]) -> bool:
    return line is not None and not line.strip()


def joined_spans(spans: list[Span], most: int) -> list[Span]:
    """Consecutive `spans` joined in runs of equal length, so that at most `most` remain."""
    run = -(-len(spans) // most)
    if run <= 1:
        return spans
    runs = [spans[start:start + run] for start in range(0, len(spans), run)]
    return [Span(group[0].offset, group[0].lines_before, group[0].rows_before, group[-1].end) for group in runs]


def rows_per_chunk(handle: BinaryIO, cap: int, chunk_rows: int, header: bool, numbered_by_line: bool,
                   span_chunks: int = 0) -> tuple[list[int], list[Span]]:
    """How many rows each chunk of `chunk_rows` holds, and (with `span_chunks`) the `Span`s of
    that many chunks each. Blank lines are not rows; a table with a header skips its first line.
    Rows are numbered by line (JSONL: the key is the line) or by row among the non-blank lines
    (CSV/TSV), and chunks cut that numbering."""
    counts: list[int] = []
    starts: list[tuple[int, int, int]] = []  # (offset, lines before, rows before) per span
    row = 0
    position = handle.tell()
    for number, line in lines(handle, cap):
        if not (header and number == 1) and not is_blank(line):
            row += 1
            chunk = ((number if numbered_by_line else row) - 1) // chunk_rows
            if span_chunks and chunk >= len(counts) and chunk // span_chunks >= len(starts):
                starts.append((position, number - 1, row - 1))  # the first row of the span's first chunk
            while len(counts) <= chunk:
                counts.append(0)
            counts[chunk] += 1
        if span_chunks:
            position = handle.tell()
    spans = [Span(offset, lines_before, rows_before, starts[index + 1][0] if index + 1 < len(starts) else -1)
             for index, (offset, lines_before, rows_before) in enumerate(starts)]
    return counts, spans


def default_cap(max_chars: int, inline_image_bytes: int = 0) -> int:
    """The longest line a default build reads: room for a caption of `max_chars` characters
    written as JSON escapes, other columns, and a base64 image when the rows carry one."""
    return max(1 << 20, 32 * max_chars) + math.ceil(inline_image_bytes * 4 / 3)
