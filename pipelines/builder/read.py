"""`ReadChunks`: input files -> chunk input files in the staging area, plus packed dedup hashes.

A reader streams one unit (a table file, or a chunk's worth of an image folder's files), cleans
every row's text (rejecting empty or too short captions before anything is downloaded), and
writes each chunk's records, rejects included, to `OUT/staging/inputs/` (see `staging`). What
leaves it is small and per chunk, never per row:

- the chunk (`ChunkRows`: its key and rows), which the download stage picks up and reads back;
- for dedup, per bucket, one packed byte string of `(16-byte hash, index in chunk, 10-byte id)`
  entries (`dedup.pack`): 30 bytes per row, whatever the runner keeps in memory while grouping.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from . import neardup, quality, staging
from .dedup import KEYS, HashPacker, text_key, url_key
from .plan import chunk_of, record_order
from .readers import read_source_file
from .records import ChunkKey, ChunkRows, Order, Packed, ReadUnit, is_reject, reject
from .sources import row_cap
from .text import clean_text, word_count
from mmae.schemas.config import DataConfig


def clean_record(record: dict[str, Any], config: DataConfig) -> dict[str, Any]:
    """Normalise a caption/text; a reject when it is empty or too short (nothing is downloaded for it)."""
    if is_reject(record) or "caption" not in record:
        return record
    text = clean_text(record["caption"], config.text.max_chars)
    if not text:
        return reject(record, "empty_caption")
    words = word_count(text)
    if words < config.text.min_words:
        return reject(record, "too_few_words", f"{words} < {config.text.min_words}")
    if quality.applies(config.quality, record["kind"]):
        failed_rule = quality.problem(text, config.quality)
        if failed_rule is not None:
            return reject(record, *failed_rule)
    return {**record, "caption": text}


def _unencodable(record: dict[str, Any]) -> Optional[str]:
    """The first field that is not valid Unicode text (a lone surrogate cannot be stored)."""
    for name in ("url", "caption", "label"):
        value = record.get(name)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return name
    return None


def dedup_key(record: dict[str, Any]) -> bytes:
    return text_key(record) if record["kind"] == "text" else url_key(record)


class ReadChunksFn(beam.DoFn):
    """ReadUnit -> ChunkRows per chunk; tagged `KEYS`: (bucket, Packed)."""

    def __init__(self, config: DataConfig, chunk_rows: int, buckets: int) -> None:
        self.config = config
        self.chunk_rows = chunk_rows
        self.buckets = buckets
        self.rows_read = Metrics.counter("mmae", "rows_read")

    def process(self, unit: ReadUnit) -> Iterator[Any]:
        source = self.config.sources[unit.source]
        current: Optional[ChunkKey] = None
        records: list[dict[str, Any]] = []
        for file_number, source_file, skip, span in unit.files:
            last_row = 0
            for record in read_source_file(source, source_file, row_cap(self.config, source), span):
                order = record_order(unit.source, file_number, source_file, record["key"])
                if order.row <= last_row:  # rows without a number in their key (tar samples) follow the one before
                    order = Order(order.source, order.file, last_row + 1)
                last_row = order.row
                if order.row <= skip:  # `--append`: a row the dataset has already
                    continue
                self.rows_read.inc()
                field = _unencodable(record)
                if field is not None:
                    safe = {**record, "url": (record.get("url") or "").encode("utf-8", "replace").decode() or None}
                    record = reject(safe, "invalid_utf8", f"{field} is not valid Unicode (lone surrogate)")
                record = clean_record(record, self.config)
                chunk = chunk_of(order, self.chunk_rows)
                if chunk != current:
                    if records:
                        yield from self._flush(current, records)
                    current, records = chunk, []
                records.append(record)
        if records:
            yield from self._flush(current, records)

    def _flush(self, key: ChunkKey, records: list[dict[str, Any]]) -> Iterator[Any]:
        source = self.config.sources[key.source]
        staging.write_input(staging.input_url(self.config.output, source.name, key), records)
        yield ChunkRows(key, len(records))
        what = "text" if source.kind == "text" else "url"
        packer = HashPacker(self.buckets)
        for index, record in enumerate(records):
            if not is_reject(record):
                packer.add(dedup_key(record), index, record["id"])
        for bucket, packed in packer.items():
            yield beam.pvalue.TaggedOutput(KEYS, (bucket, Packed(key, what, packed)))
        threshold = self.config.quality.near_duplicate_texts
        if threshold and (source.kind == "text" or (source.kind == "paired" and self.config.quality.near_duplicate_captions)):
            near = HashPacker(self.buckets)
            kept = [index for index, record in enumerate(records) if not is_reject(record)]
            high, low, owner = neardup.text_band_keys([records[index]["caption"] for index in kept], source.kind, threshold)
            near.add_many(high, low, owner, kept, [records[index]["id"] for index in kept])
            for bucket, place in near.spill(staging.keys_url(self.config.output, source.name, key, "near-text")):
                yield beam.pvalue.TaggedOutput(KEYS, (bucket, Packed(key, neardup.NEAR, place)))


class ReadChunks(beam.PTransform):
    """All sources' rows, written as chunk input files; outputs: main (ChunkRows) and `KEYS`."""

    def __init__(self, config: DataConfig, units: list[ReadUnit], chunk_rows: int, buckets: int) -> None:
        super().__init__()
        self.config = config
        self.units = units
        self.chunk_rows = chunk_rows
        self.buckets = buckets

    def expand(self, pipeline):
        return (
            pipeline
            | "ListUnits" >> beam.Create(self.units)
            # One file can hold millions of rows: spread files over workers before reading.
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadChunksFn(self.config, self.chunk_rows, self.buckets)).with_outputs(
                KEYS, main="chunks")
        )
