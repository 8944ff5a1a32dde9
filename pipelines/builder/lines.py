"""Lines of a text table (JSONL, CSV, TSV) with memory bounded by a setting, not by the input.

A stranger's file can hold one line of hundreds of megabytes (a pasted blob, a gzip that
expands to a single line). `lines` never holds more than `cap` + 1 bytes of one line: a longer
line is skipped in pieces to its end and reported as too long. The planner counts rows with the
same function the reader reads them with, so both see the same rows.
"""

from __future__ import annotations

import math
from typing import BinaryIO, Iterator, Optional

PIECE = 1 << 20  # bytes read at a time while skipping the rest of a too-long line


def lines(handle: BinaryIO, cap: int) -> Iterator[tuple[int, Optional[bytes]]]:
    """(1-based line number, the line without its newline) per line; None for a line longer
    than `cap` bytes, which is consumed without being held."""
    number = 0
    while True:
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


def rows_per_chunk(handle: BinaryIO, cap: int, chunk_rows: int, header: bool, numbered_by_line: bool) -> list[int]:
    """How many rows each chunk of `chunk_rows` holds. Blank lines are not rows; a table with a
    header skips its first line. Rows are numbered by line (JSONL: the key is the line) or
    by row among the non-blank lines (CSV/TSV), and chunks cut that numbering."""
    counts: list[int] = []
    row = 0
    for number, line in lines(handle, cap):
        if header and number == 1:
            continue
        if is_blank(line):
            continue
        row += 1
        position = number if numbered_by_line else row
        chunk = (position - 1) // chunk_rows
        while len(counts) <= chunk:
            counts.append(0)
        counts[chunk] += 1
    return counts


def default_cap(max_chars: int, inline_image_bytes: int = 0) -> int:
    """The longest line a default build reads: room for a caption of `max_chars` characters
    written as JSON escapes, other columns, and a base64 image when the rows carry one."""
    return max(1 << 20, 32 * max_chars) + math.ceil(inline_image_bytes * 4 / 3)
