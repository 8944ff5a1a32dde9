"""`Finalize`: runs once, after every shard is written: tokenizer.model, build_report.json and, if
every input row is accounted for and some were written, manifest.json (written last: its presence
marks a finished build)."""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Optional

import apache_beam as beam
from .records import ChunkSummary
from .tokenizer import Tokenizer, special_ids
from ..shards import join, write_atomic, write_json
from mmae.schemas.config import DataConfig
from mmae.schemas.shard import KINDS, SCHEMA_VERSION


def rows_read(summary: ChunkSummary, names: list[str]) -> tuple[str, int]:
    """(source name, rows) of one chunk summary."""
    return names[summary.chunk.source], summary.rows


def _reasons(reject_shards: list[dict]) -> dict[str, dict[str, int]]:
    """Per source and reason, from what the rejects files hold."""
    nested: dict[str, dict[str, int]] = {}
    for entry in reject_shards:
        for source, reasons in entry["reasons"].items():
            for reason, count in reasons.items():
                nested.setdefault(source, {})[reason] = nested.get(source, {}).get(reason, 0) + count
    return nested


def build_report(config: DataConfig, read: dict[str, int], shards: list[dict], rejected: dict[str, dict[str, int]]):
    """Per source: read, written (per kind), rejected (per reason); `problems` lists any imbalance."""
    written: dict[str, dict[str, int]] = {}
    for entry in shards:
        for source, count in entry.get("sources", {}).items():
            kinds = written.setdefault(source, {})
            kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + count
    per_source = {}
    problems = []
    for source in config.sources:
        n_read = read.get(source.name, 0)
        n_written = sum(written.get(source.name, {}).values())
        n_rejected = sum(rejected.get(source.name, {}).values())
        per_source[source.name] = {
            "kind": source.kind,
            "read": n_read,
            "written": n_written,
            "rejected": n_rejected,
            "reasons": dict(sorted(rejected.get(source.name, {}).items())),
        }
        if n_read != n_written + n_rejected:
            problems.append(f"{source.name}: read {n_read} != written {n_written} + rejected {n_rejected}")
    reasons: dict[str, int] = {}
    for source in per_source.values():
        for reason, count in source["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    rows = {kind: sum(entry["rows"] for entry in shards if entry["kind"] == kind) for kind in KINDS}
    return {
        "read": sum(read.values()),
        "written": rows,
        "rejected": sum(reasons.values()),
        "reasons": dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        "sources": per_source,
        "balanced": not problems,
        "problems": problems,
    }


class FinalizeFn(beam.DoFn):
    def __init__(self, config: DataConfig, inputs: Optional[dict[str, Any]] = None, allow_empty: bool = False) -> None:
        self.config = config
        self.inputs = inputs or {}
        self.allow_empty = allow_empty  # `--append`: additions that were all rejected still finish

    def process(self, _, shards, reject_shards, read_counts, model) -> Iterator[dict[str, Any]]:
        shards = sorted(shards, key=lambda entry: entry["path"])
        reject_shards = sorted(reject_shards, key=lambda entry: entry["path"])
        report = build_report(self.config, dict(read_counts), shards, _reasons(reject_shards))
        reject_shards = [{name: value for name, value in entry.items() if name != "reasons"} for entry in reject_shards]
        tokenizer = None
        if model:
            write_atomic(join(self.config.output, "tokenizer.model"), model)
            tokenizer = {
                "path": "tokenizer.model",
                "sha256": hashlib.sha256(model).hexdigest(),
                "vocab_size": Tokenizer(model, 1).vocab_size,
                "special_ids": special_ids(model),
            }
        write_json(join(self.config.output, "build_report.json"), report)
        if report["balanced"] and (sum(report["written"].values()) > 0 or self.allow_empty):
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "rows": report["written"],
                "shards": shards,
                "rejects": reject_shards,
                "rejected": sum(entry["rows"] for entry in reject_shards),
                "tokenizer": tokenizer,
                "sources": {source.name: source.kind for source in self.config.sources},
                "config": self.config.model_dump(mode="json"),
                # What was read, file by file (size, sha256, last row): what `--append` compares.
                "inputs": self.inputs,
            }
            write_json(join(self.config.output, "manifest.json"), manifest)
        yield report


class Finalize(beam.PTransform):
    """Chunk summaries (rows read), shard and rejects entries (rows written and rejected), model."""

    def __init__(self, config: DataConfig, summaries, shards, reject_shards, model,
                 inputs: Optional[dict[str, Any]] = None, allow_empty: bool = False) -> None:
        super().__init__()
        self.config, self.inputs, self.allow_empty = config, inputs, allow_empty
        self.summaries, self.shards, self.reject_shards, self.model = summaries, shards, reject_shards, model

    def expand(self, pipeline):
        read_counts = (
            self.summaries
            | "RowsRead" >> beam.Map(rows_read, [source.name for source in self.config.sources])
            | "CountRead" >> beam.CombinePerKey(sum)
        )
        return (
            pipeline
            | "Once" >> beam.Create([None])
            | "Finalize" >> beam.ParDo(
                FinalizeFn(self.config, self.inputs, self.allow_empty),
                beam.pvalue.AsList(self.shards),
                beam.pvalue.AsList(self.reject_shards),
                beam.pvalue.AsList(read_counts),
                beam.pvalue.AsSingleton(self.model),
            )
        )
