"""Exact deduplication; the row that came first in the input wins, whatever order the runner
delivers rows in. `DedupBy` works on records (URLs within a source and texts, before
downloading); `DedupImages` on the download stage's small candidates (the same stored image,
plus caption for paired rows, within a kind), looking up the few duplicates' key and URL in
the staging area for their reject rows."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import apache_beam as beam

from pipelines.build import staging
from pipelines.build.download import Candidate, candidate_dedup, candidate_id, candidate_position
from pipelines.build.sources import reject
from schemas.config import DataConfig

REJECTED = "rejected"


def url_key(record: dict[str, Any]) -> tuple:
    return ("url", record["source"], record["url"])


def text_key(record: dict[str, Any]) -> tuple:
    return ("text", record["caption"])


def _keyed(record: dict[str, Any], key_fn: Callable) -> tuple:
    return key_fn(record), record


def _has_key(pair: tuple) -> bool:
    return pair[0] is not None


def _no_key(pair: tuple) -> bool:
    return pair[0] is None


def _value(pair: tuple) -> Any:
    return pair[1]


class KeepFirstFn(beam.DoFn):
    def __init__(self, what: str) -> None:
        self.what = what

    def process(self, element: tuple[Any, Iterable[dict[str, Any]]]) -> Iterator[Any]:
        _, group = element
        ordered = sorted(group, key=lambda record: record["order"])
        yield ordered[0]
        for record in ordered[1:]:
            yield beam.pvalue.TaggedOutput(REJECTED, reject(record, "duplicate", f"same {self.what} as {ordered[0]['id']}"))


class DedupBy(beam.PTransform):
    """Outputs: main (first of each key; rows whose key is None pass through) and `rejected`."""

    def __init__(self, key_fn: Callable[[dict[str, Any]], Any], what: str) -> None:
        super().__init__()
        self.key_fn = key_fn
        self.what = what

    def expand(self, records):
        keyed = records | "Key" >> beam.Map(_keyed, self.key_fn)
        unkeyed = keyed | "NoKey" >> beam.Filter(_no_key) | "Unwrap" >> beam.Map(_value)
        first = (
            keyed
            | "HasKey" >> beam.Filter(_has_key)
            | "Group" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(KeepFirstFn(self.what)).with_outputs(REJECTED, main="records")
        )
        records_out = (first.records, unkeyed) | "Merge" >> beam.Flatten()
        return {"records": records_out, REJECTED: first[REJECTED]}


def _keyed_candidate(candidate: Candidate) -> tuple:
    return candidate_dedup(candidate), candidate


def _first_candidate(element: tuple[Any, Iterable[Candidate]]) -> Iterator[Any]:
    _, group = element
    ordered = sorted(group, key=candidate_position)
    yield ordered[0]
    for candidate in ordered[1:]:
        yield beam.pvalue.TaggedOutput(DUPLICATES, (candidate, candidate_id(ordered[0])))


DUPLICATES = "duplicates"


class DuplicateRejectFn(beam.DoFn):
    """(duplicate candidate, id of the row kept) -> its reject row, key and URL read from staging."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config

    def process(self, element: tuple[Candidate, str]) -> Iterator[dict[str, Any]]:
        candidate, first_id = element
        source_index, file_number, chunk_number, index = candidate_position(candidate)
        url = staging.chunk_url(self.config.output, self.config.sources[source_index].name,
                                (source_index, file_number, chunk_number))
        row = next(staging.read_rows(url, [index]))
        yield reject(row, "duplicate", f"same image as {first_id}")


class DedupImages(beam.PTransform):
    """Candidates -> kept candidates (text rows pass) and `rejected` rows for the duplicates."""

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, candidates):
        keyed = candidates | "Key" >> beam.Map(_keyed_candidate)
        text_rows = keyed | "NoKey" >> beam.Filter(_no_key) | "Unwrap" >> beam.Map(_value)
        first = (
            keyed
            | "HasKey" >> beam.Filter(_has_key)
            | "Group" >> beam.GroupByKey()
            | "KeepFirst" >> beam.FlatMap(_first_candidate).with_outputs(DUPLICATES, main="records")
        )
        rejects = first[DUPLICATES] | "Rejects" >> beam.ParDo(DuplicateRejectFn(self.config))
        records = (first.records, text_rows) | "Merge" >> beam.Flatten()
        return {"records": records, REJECTED: rejects}
