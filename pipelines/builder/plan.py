"""The work plan of a build: which files each source has, how many rows, and how rows are cut
into chunks.

A chunk is the unit of downloading, committing and resuming: a run of `chunk_rows` consecutive
input rows of one source file (for an image folder, of its sorted file list). A row's place in
the input, its `order` = (source index, file number, row number), decides its chunk and which of
two duplicates is kept, so the plan is the same on every runner and every run.
"""

from __future__ import annotations

import math
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from . import neardup, webdataset
from .lines import Span, joined_spans, rows_per_chunk
from .records import ChunkKey, FileRef, Order, ReadUnit
from .sources import SourceError, SourceFile, expand_source, required_columns, row_cap
from mmae.schemas.config import DataConfig

# Dedup hashes are grouped in buckets of about this many entries (30 bytes each, one per row for
# exact dedup, one per band for near-duplicates): the memory one dedup group needs.
ROWS_PER_BUCKET = 250_000
# An uncompressed line table (JSONL, text, CSV, TSV) is read in spans, by as many readers as
# there are workers: one file of millions of rows is common, and its reading (parsing, cleaning,
# the quality rules) would otherwise hold up every download on one core. Spans are whole chunks,
# as short as this many spans a file allows: downloading waits for the last reader (every
# duplicate must be known), so short spans let the workers finish reading together (spans of 4
# chunks left one of 2 workers reading 3 of a 20-chunk file's 5 spans while the other waited,
# 0.2-0.3 s of a 10,000-row build), and the bound keeps the list of read units, which the
# pipeline itself carries (~280 bytes a span), small for a file of any length.
MAX_SPANS = 512


def record_order(source_index: int, file_number: int, source_file: SourceFile, key: str) -> Order:
    """Where a record stood in the input. Image-folder files are the rows of one virtual file."""
    if source_file.format == "image":
        return Order(source_index, 0, file_number + 1)
    row = key.rpartition(":")[2]
    return Order(source_index, file_number, int(row) if row.isdigit() else 0)


def chunk_of(order: Order, chunk_rows: int) -> ChunkKey:
    return ChunkKey(order.source, order.file, max(order.row - 1, 0) // chunk_rows)


@dataclass(frozen=True)
class PlannedFile:
    source_index: int
    number: int  # position among its source's files
    file: SourceFile
    rows: int  # input rows (non-blank lines of a text table); image files count 1
    skip: int = 0  # `--append`: rows numbered up to this are in the dataset already
    spans: tuple[Span, ...] = ()  # where its readers start, when it is read in pieces


@dataclass
class BuildPlan:
    files: list[PlannedFile]
    chunk_rows: int
    chunk_input_rows: dict[ChunkKey, int] = field(default_factory=dict)
    existing_rows: int = 0  # `--append`: the dataset's rows, whose dedup keys join the groups
    keys_per_row: int = 1  # dedup entries one row puts in one grouping (more with near-duplicates)

    @property
    def total_rows(self) -> int:
        return sum(self.chunk_input_rows.values())

    @property
    def total_chunks(self) -> int:
        return len(self.chunk_input_rows)

    @property
    def buckets(self) -> int:
        """How many groups the dedup hashes are spread over (~ROWS_PER_BUCKET entries each)."""
        return max(1, math.ceil((self.total_rows + self.existing_rows) * self.keys_per_row / ROWS_PER_BUCKET))

    def units(self) -> list[ReadUnit]:
        """What the pipeline's reader is given: one unit per table file, one per chunk of an
        image folder's files; a unit's rows are consecutive in input order."""
        units: dict[tuple, ReadUnit] = {}
        for planned in self.files:
            if planned.file.format == "image":
                chunk = planned.number // self.chunk_rows
                unit = units.setdefault(("image", planned.source_index, chunk), ReadUnit(planned.source_index, []))
            elif planned.spans:
                for index, span in enumerate(planned.spans):
                    units[("span", planned.source_index, planned.number, index)] = ReadUnit(
                        planned.source_index, [FileRef(planned.number, planned.file, planned.skip, span)])
                continue
            else:
                unit = units.setdefault(("table", planned.source_index, planned.number),
                                        ReadUnit(planned.source_index, []))
            unit.files.append(FileRef(planned.number, planned.file, planned.skip))
        return list(units.values())


def chunk_counts(source_file: SourceFile, columns: list[str], chunk_rows: int,
                 cap: int) -> tuple[list[int], list[Span]]:
    """Input rows per chunk of one file, read once by the driver (cheap next to downloading
    them): the same rows the reader will yield (blank lines are not rows). And the spans it is
    read in, for an uncompressed line table of more than one span (none otherwise)."""
    if source_file.format == "image":
        return [1], []
    if source_file.format == "tar":
        rows = webdataset.count_samples(source_file.path)
    elif source_file.format == "parquet":
        with fsspec.open(source_file.path, "rb") as handle, pq.ParquetFile(handle) as parquet:
            rows = parquet.metadata.num_rows
    else:
        by_line = source_file.format in ("jsonl", "txt")
        seekable = fsspec.utils.infer_compression(source_file.path) is None
        with fsspec.open(source_file.path, "rb", compression="infer") as handle:
            counts, spans = rows_per_chunk(handle, cap, chunk_rows, header=not by_line, numbered_by_line=by_line,
                                           span_chunks=1 if seekable else 0)
        spans = joined_spans(spans, MAX_SPANS)
        return counts, spans if len(spans) > 1 else []
    return [min(chunk_rows, rows - chunk * chunk_rows) for chunk in range(math.ceil(rows / chunk_rows))], []


def keys_per_row(config: DataConfig) -> int:
    """The most dedup entries one row adds to one grouping: the exact hash, plus the MinHash bands
    of its text or the (variant, band) keys of its image."""
    near_texts = neardup.bands_for(config.quality.near_duplicate_texts)[0] if config.quality.near_duplicate_texts else 0
    near_images = neardup.IMAGE_VARIANTS * neardup.IMAGE_BANDS if config.quality.near_duplicate_images is not None else 0
    return 1 + max(near_texts, near_images)


def make_plan(config: DataConfig, log=None, append=None) -> BuildPlan:
    """Expand every source (SourceError names the problem) and count its rows into chunks.
    `append` (`append.AppendPlan`): only the files it wants, from the row after the old ones."""
    plan = BuildPlan(files=[], chunk_rows=config.chunk_rows, existing_rows=append.existing_rows if append else 0,
                     keys_per_row=keys_per_row(config))
    for source_index, source in enumerate(config.sources):
        source_files = expand_source(source)
        columns = required_columns(source)
        for number, source_file in enumerate(source_files):
            if append is not None and not append.wants(source_index, source_file.relative):
                continue
            skip = append.skip(source_index, source_file.relative) if append is not None else 0
            try:
                counts, spans = chunk_counts(source_file, columns, config.chunk_rows, row_cap(config, source))
            except (OSError, EOFError, zlib.error, ValueError, pa.ArrowException, tarfile.TarError) as error:
                raise SourceError(f"source {source.name!r}: cannot read {source_file.path}: {error}") from None
            if skip:  # the rows before are the dataset's (their count is exact when rows are lines)
                whole, counts = skip // config.chunk_rows, list(counts)
                counts[:whole] = [0] * min(whole, len(counts))
                if whole < len(counts):
                    counts[whole] = max(0, counts[whole] - skip % config.chunk_rows)
            plan.files.append(PlannedFile(source_index, number, source_file, sum(counts), skip, tuple(spans)))
            if source_file.format == "image":
                key = chunk_of(record_order(source_index, number, source_file, ""), config.chunk_rows)
                plan.chunk_input_rows[key] = plan.chunk_input_rows.get(key, 0) + 1
                continue
            for chunk, rows in enumerate(counts):
                if rows:
                    plan.chunk_input_rows[ChunkKey(source_index, number, chunk)] = rows
        if log is not None:
            log.info("source %s (%s): %d file(s)", source.name, source.kind, len(source_files))
    return plan


def chunk_name(key: ChunkKey) -> str:
    return f"{key.file:05d}-{key.chunk:06d}"


def parse_chunk_name(name: str) -> Optional[tuple[int, int]]:
    stem = name.rsplit("/", 1)[-1].removesuffix(".parquet")
    parts = stem.split("-")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        return None
    return int(parts[0]), int(parts[1])
