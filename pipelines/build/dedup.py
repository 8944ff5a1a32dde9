"""`DedupBy`: exact deduplication on a key; the row that came first in the input wins, whatever
order the runner delivers rows in. Used three times: URLs within a source and texts before
downloading, image bytes (+ caption) after."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import apache_beam as beam

from pipelines.build.sources import reject

REJECTED = "rejected"


def url_key(record: dict[str, Any]) -> tuple:
    return ("url", record["source"], record["url"])


def text_key(record: dict[str, Any]) -> tuple:
    return ("text", record["caption"])


def image_key(candidate: dict[str, Any]) -> Optional[str]:
    """Computed by the download stage (kind + image sha256 + caption); None for text rows."""
    return candidate["dedup"]


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
