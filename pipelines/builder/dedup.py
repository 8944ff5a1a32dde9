"""Exact deduplication; the row that came first in the input wins, whatever order the runner
delivers rows in. `FindDuplicates` works before downloading (the same URL within a source,
the same cleaned text): it names the later copies, which the download stage rejects unfetched.
`DedupImages` works after it, on the download stage's small candidates (the same stored image,
plus caption for paired rows, within a kind), looking up the few duplicates' key and URL in
the staging area for their reject rows."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Iterator

import apache_beam as beam

from pipelines.builder import staging
from pipelines.builder.download import Candidate, candidate_dedup, candidate_id, candidate_position
from pipelines.builder.sources import REJECTED, reject
from schemas.config import DataConfig


def _digest(*parts: str) -> bytes:
    text = "\x00".join(parts)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def url_key(record: dict[str, Any]) -> bytes:
    """The same URL within a source (16 bytes: only hashes cross the shuffle)."""
    return _digest("url", record["source"], record["url"])


def text_key(record: dict[str, Any]) -> bytes:
    """The same cleaned text."""
    return _digest("text", record["caption"])


def _has_key(pair: tuple) -> bool:
    return pair[0] is not None


def _no_key(pair: tuple) -> bool:
    return pair[0] is None


def _value(pair: tuple) -> Any:
    return pair[1]


def _key_order_id(record: dict[str, Any], key_fn: Callable) -> tuple:
    return key_fn(record), (record["order"], record["id"])


class LaterCopiesFn(beam.DoFn):
    def __init__(self, what: str) -> None:
        self.what = what

    def process(self, element: tuple[bytes, Iterable[tuple[tuple, str]]]) -> Iterator[tuple[str, str]]:
        _, group = element
        ordered = sorted(group)
        for _, row_id in ordered[1:]:
            yield row_id, f"same {self.what} as {ordered[0][1]}"


class FindDuplicates(beam.PTransform):
    """Records -> (id, detail) of every row whose key an earlier row (in input order) has.

    Only a 16-byte hash, the input position and the id of each row cross the shuffle; the
    duplicates (usually few) become a side input of the download stage, which rejects them
    without fetching anything."""

    def __init__(self, key_fn: Callable[[dict[str, Any]], bytes], what: str) -> None:
        super().__init__()
        self.key_fn = key_fn
        self.what = what

    def expand(self, records):
        return (
            records
            | "Key" >> beam.Map(_key_order_id, self.key_fn)
            | "Group" >> beam.GroupByKey()
            | "LaterCopies" >> beam.ParDo(LaterCopiesFn(self.what))
        )


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
