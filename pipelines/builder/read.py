"""`ReadSources` and `CleanText`: input files -> records, and the text checks that run before
anything is downloaded. Rows that cannot be used go to the `rejected` output with a reason."""

from __future__ import annotations

from typing import Any, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines.builder.plan import record_order
from pipelines.builder.sources import REJECTED, SourceFile, read_source_file, reject
from pipelines.builder.text import clean_text, word_count
from schemas.config import DataConfig


class ReadRowsFn(beam.DoFn):
    """(source index, file number, SourceFile) -> records (each with its input `order`) and rejects."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.rows_read = Metrics.counter("mmae", "rows_read")

    def process(self, element: tuple[int, int, SourceFile]) -> Iterator[Any]:
        source_index, file_number, source_file = element
        source = self.config.sources[source_index]
        for record in read_source_file(source, source_file):
            self.rows_read.inc()
            if "reason" in record:
                yield beam.pvalue.TaggedOutput(REJECTED, record)
                continue
            record["order"] = record_order(source_index, file_number, source_file, record["key"])
            yield record


class ReadSources(beam.PTransform):
    """All sources' rows; outputs: main (records) and `rejected`."""

    def __init__(self, config: DataConfig, files: list[tuple[int, int, SourceFile]]) -> None:
        super().__init__()
        self.config = config
        self.files = files

    def expand(self, pipeline):
        return (
            pipeline
            | "ListFiles" >> beam.Create(self.files)
            # One file can hold millions of rows: spread files over workers before reading.
            | "Spread" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(ReadRowsFn(self.config)).with_outputs(REJECTED, main="records")
        )


class CleanTextFn(beam.DoFn):
    """Normalise captions/texts; reject empty or too short ones before anything is downloaded."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        if "caption" in record:
            text = clean_text(record["caption"], self.config.text.max_chars)
            if not text:
                yield beam.pvalue.TaggedOutput(REJECTED, reject(record, "empty_caption"))
                return
            words = word_count(text)
            if words < self.config.text.min_words:
                yield beam.pvalue.TaggedOutput(
                    REJECTED, reject(record, "too_few_words", f"{words} < {self.config.text.min_words}"))
                return
            record = {**record, "caption": text}
        yield record


class CleanText(beam.PTransform):
    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, records):
        return records | "Clean" >> beam.ParDo(CleanTextFn(self.config)).with_outputs(REJECTED, main="records")
