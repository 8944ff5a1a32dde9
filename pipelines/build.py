"""`mmae build`: the Beam pipeline that turns input corpora into Parquet shards.

    mmae demo-data build/demo/raw            # a synthetic corpus to try it on
    mmae build --config pipeline.yaml        # embedded DirectRunner
    mmae build --config pipeline.yaml -- --direct_num_workers=2 --direct_running_mode=multi_processing
    mmae build --config pipeline.yaml -- --runner=FlinkRunner --flink_master=localhost:8081

Read top-down, the pipeline is a few named composites:

    ReadSources -> CleanText -> DedupBy(url | text) -> DownloadImages -> DedupBy(image)
        -> Tokenize -> WriteShards (+ WriteShards for rejects) -> Finalize (manifest, report)

Every input row ends either in a shard or in `rejects/` with a reason; Finalize checks that
`read = written + rejected` per source and fails the build if it does not hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.fetch import Fetcher, FetchError
from pipelines.images import ImageReject, process_image
from pipelines.shards import join, write_atomic, write_json, write_shard
from pipelines.sources import SourceError, SourceFile, expand_source, read_source_file, reject
from pipelines.text import clean_text, word_count
from pipelines.tokenizer import SampleTexts, Tokenizer, special_ids, train_sentencepiece
from schemas.config import Config, DataConfig
from schemas.shard import KINDS, SCHEMA_VERSION

log = logging.getLogger("mmae.build")

REJECTED = "rejected"
OUTPUT_ENTRIES = ("paired", "image", "text", "rejects", "manifest.json", "build_report.json", "tokenizer.model")


class BuildError(RuntimeError):
    """The build cannot start or finish; the message says why."""


# --------------------------------------------------------------------------------------------
# Progress reporting shared by the DoFns of one worker process.


class _Progress:
    """Counts per worker process and logs a line every `every_s` seconds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.last = self.start
        self.counts: dict[str, int] = {}

    def add(self, name: str, count: int, every_s: float) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + count
            now = time.monotonic()
            if now - self.last < every_s:
                return
            self.last = now
            elapsed = now - self.start
            images = self.counts.get("images_ok", 0)
            summary = ", ".join(f"{key}={value}" for key, value in sorted(self.counts.items()))
            log.info("progress: %s; %.1f images/s over %.0fs", summary, images / max(elapsed, 1e-9), elapsed)


PROGRESS = _Progress()


# --------------------------------------------------------------------------------------------
# Reading


class ReadRows(beam.DoFn):
    """(source index, SourceFile) -> records and reader rejects."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.rows_read = Metrics.counter("mmae", "rows_read")

    def process(self, element: tuple[int, SourceFile]) -> Iterator[Any]:
        index, source_file = element
        source = self.config.sources[index]
        count = 0
        for record in read_source_file(source, source_file):
            count += 1
            yield beam.pvalue.TaggedOutput(REJECTED, record) if "reason" in record else record
            if count % 10_000 == 0:
                PROGRESS.add("rows_read", 10_000, self.config.progress_every_s)
        self.rows_read.inc(count)
        PROGRESS.add("rows_read", count % 10_000, self.config.progress_every_s)


class ReadSources(beam.PTransform):
    """All sources' rows; output tags: main (records) and `rejected`."""

    def __init__(self, config: DataConfig, files: list[tuple[int, SourceFile]]) -> None:
        super().__init__()
        self.config = config
        self.files = files

    def expand(self, pipeline):
        return (
            pipeline
            | "ListFiles" >> beam.Create(self.files)
            | "ReadFiles" >> beam.ParDo(ReadRows(self.config)).with_outputs(REJECTED, main="records")
        )


# --------------------------------------------------------------------------------------------
# Text


class CleanText(beam.DoFn):
    """Normalise captions/texts; reject empty or too short ones before anything is downloaded."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        if "caption" in record:
            text = clean_text(record["caption"], self.config.text.max_chars)
            if not text:
                yield beam.pvalue.TaggedOutput(REJECTED, reject(record, "empty_caption"))
                return
            if word_count(text) < self.config.text.min_words:
                yield beam.pvalue.TaggedOutput(
                    REJECTED, reject(record, "too_few_words", f"{word_count(text)} < {self.config.text.min_words}")
                )
                return
            record = {**record, "caption": text}
        yield record


def url_key(record: dict[str, Any]) -> tuple:
    return ("url", record["source"], record["url"])


def text_key(record: dict[str, Any]) -> tuple:
    return ("text", record["caption"])


def image_key(record: dict[str, Any]) -> tuple:
    # Paired rows keep one row per (image, caption): COCO-style multiple captions are not duplicates.
    return ("image", record["kind"], record["image_sha256"], record.get("caption"))


def input_order(record: dict[str, Any]) -> tuple:
    """Where a row stood in the input: (source, file, row number); deterministic on any runner."""
    path, _, row = record["key"].rpartition(":")
    return (record["source"], path, int(row)) if row.isdigit() else (record["source"], record["key"], 0)


class _KeepFirst(beam.DoFn):
    def __init__(self, what: str) -> None:
        self.what = what

    def process(self, element: tuple[Any, Iterable[dict[str, Any]]]) -> Iterator[Any]:
        _, group = element
        ordered = sorted(group, key=input_order)
        yield ordered[0]
        for record in ordered[1:]:
            yield beam.pvalue.TaggedOutput(REJECTED, reject(record, "duplicate", f"same {self.what} as {ordered[0]['id']}"))


def _keyed(record: dict[str, Any], key_fn) -> tuple:
    return key_fn(record), record


class DedupBy(beam.PTransform):
    """Exact dedup on a key; the row that came first in the input wins, whatever the arrival order."""

    def __init__(self, key_fn, what: str) -> None:
        super().__init__()
        self.key_fn = key_fn
        self.what = what

    def expand(self, records):
        return (
            records
            | "Key" >> beam.Map(_keyed, self.key_fn)
            | "Group" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirst(self.what)).with_outputs(REJECTED, main="records")
        )


# --------------------------------------------------------------------------------------------
# Images


class DownloadAndProcess(beam.DoFn):
    """A batch of records -> records with image fields (or rejects).

    Each record is fetched *and* decoded/resized on a bounded thread pool: network waits
    overlap, and Pillow releases the GIL while it decodes, resizes and encodes, so one worker
    process keeps several cores busy.
    """

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.ok = Metrics.counter("mmae", "images_ok")
        self.failed = Metrics.counter("mmae", "images_rejected")

    def setup(self) -> None:
        self.fetcher = Fetcher(self.config.download)
        self.pool = ThreadPoolExecutor(max_workers=self.config.download.threads, thread_name_prefix="mmae-fetch")

    def teardown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _fetch_and_process(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            result = self.fetcher.fetch(record["url"])
        except FetchError as error:
            return reject(record, error.reason, error.detail)
        try:
            image = process_image(result.data, self.config.image)
        except ImageReject as error:
            if error.reason == "decode_error" and _looks_like_text(result.content_type):
                return reject(record, "not_image", f"Content-Type {result.content_type}")
            return reject(record, error.reason, error.detail)
        return {
            **record,
            "image": image.data,
            "image_format": image.format,
            "width": image.width,
            "height": image.height,
            "original_width": image.original_width,
            "original_height": image.original_height,
            "image_sha256": image.sha256,
        }

    def process(self, batch: list[dict[str, Any]]) -> Iterator[Any]:
        for output in self.pool.map(self._fetch_and_process, batch):
            if "reason" in output:
                self.failed.inc()
                PROGRESS.add("images_rejected", 1, self.config.progress_every_s)
                yield beam.pvalue.TaggedOutput(REJECTED, output)
            else:
                self.ok.inc()
                PROGRESS.add("images_ok", 1, self.config.progress_every_s)
                yield output


def _looks_like_text(content_type: str) -> bool:
    content_type = content_type.lower()
    return content_type.startswith("text/") or "json" in content_type or "xml" in content_type


class DownloadImages(beam.PTransform):
    def __init__(self, config: DataConfig, batch_size: int = 64) -> None:
        super().__init__()
        self.config = config
        self.batch_size = batch_size

    def expand(self, records):
        return (
            records
            # Spread work over workers: reading left everything on few keys.
            | "Spread" >> beam.Reshuffle()
            | "Batch" >> beam.BatchElements(min_batch_size=self.batch_size, max_batch_size=self.batch_size)
            | "Fetch" >> beam.ParDo(DownloadAndProcess(self.config)).with_outputs(REJECTED, main="records")
        )


# --------------------------------------------------------------------------------------------
# Tokenizer


class TrainTokenizer(beam.PTransform):
    """Cleaned texts -> one serialized SentencePiece model (or the given one)."""

    def __init__(self, config: DataConfig, given_model: Optional[bytes]) -> None:
        super().__init__()
        self.config = config
        self.given_model = given_model

    def expand(self, records):
        if self.given_model is not None:
            return records.pipeline | "GivenModel" >> beam.Create([self.given_model])
        return (
            records
            | "Texts" >> beam.Map(caption_of)
            | "Sample" >> beam.CombineGlobally(SampleTexts(self.config.tokenizer.sample_size))
            | "Train" >> beam.Map(train_sentencepiece, self.config.tokenizer)
        )


class Tokenize(beam.DoFn):
    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._tokenizer: Optional[Tokenizer] = None
        self._model_hash: Optional[str] = None

    def process(self, record: dict[str, Any], model: bytes) -> Iterator[dict[str, Any]]:
        if "caption" in record and model:
            model_hash = hashlib.sha256(model).hexdigest()
            if model_hash != self._model_hash:
                self._tokenizer = Tokenizer(model, self.max_tokens)
                self._model_hash = model_hash
            record = {**record, "tokens": self._tokenizer.encode(record["caption"])}
        yield record


# --------------------------------------------------------------------------------------------
# Writing


def _shard_index(row_id: str, count: int) -> int:
    return int(row_id[:12], 16) % count


def _assign_shard(record: dict[str, Any], counts: dict[str, int], rows_per_shard: int, folder_of) -> tuple:
    folder = folder_of(record)
    count = max(1, math.ceil(counts.get(folder, 0) / rows_per_shard))
    return (folder, _shard_index(record["id"], count), count), record


class _WriteGroup(beam.DoFn):
    def __init__(self, output: str, rows_per_row_group: int) -> None:
        self.output = output
        self.rows_per_row_group = rows_per_row_group

    def process(self, element) -> Iterator[dict[str, Any]]:
        (folder, index, count), rows = element
        entry = write_shard(self.output, folder, index, count, rows, self.rows_per_row_group)
        log.info("wrote %s (%d rows, %.1f MB)", entry["path"], entry["rows"], entry["bytes"] / 1e6)
        yield entry


def kind_folder(record: dict[str, Any]) -> str:
    return record["kind"]


def rejects_folder(record: dict[str, Any]) -> str:
    return "rejects"


class WriteShards(beam.PTransform):
    """Rows -> hash-partitioned shards of ~rows_per_shard rows, sorted by id inside each shard."""

    def __init__(self, config: DataConfig, folder_of) -> None:
        super().__init__()
        self.config = config
        self.folder_of = folder_of

    def expand(self, rows):
        counts = (
            rows
            | "Folder" >> beam.Map(self.folder_of)
            | "Count" >> beam.combiners.Count.PerElement()
        )
        return (
            rows
            | "Assign" >> beam.Map(
                _assign_shard, beam.pvalue.AsDict(counts), self.config.shards.rows_per_shard, self.folder_of
            )
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteGroup(self.config.output, self.config.shards.rows_per_row_group))
        )


# --------------------------------------------------------------------------------------------
# Manifest and report


class Finalize(beam.DoFn):
    """Runs once, after every shard is written: tokenizer.model, manifest.json, build_report.json."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config

    def process(self, _, shards, reject_shards, read_counts, written_counts, reject_counts, model):
        read = dict(read_counts)
        written = {source: dict(kinds) for source, kinds in _nest(written_counts).items()}
        rejected = {source: dict(reasons) for source, reasons in _nest(reject_counts).items()}
        per_source = {}
        problems = []
        for source in self.config.sources:
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
        tokenizer = None
        if model:
            write_atomic(join(self.config.output, "tokenizer.model"), model)
            tokenizer = {
                "path": "tokenizer.model",
                "sha256": hashlib.sha256(model).hexdigest(),
                "vocab_size": Tokenizer(model, 1).vocab_size,
                "special_ids": special_ids(model),
            }
        shards = sorted(shards, key=lambda entry: entry["path"])
        rows = {kind: sum(entry["rows"] for entry in shards if entry["kind"] == kind) for kind in KINDS}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "rows": rows,
            "shards": shards,
            "rejects": sorted(reject_shards, key=lambda entry: entry["path"]),
            "rejected": sum(entry["rows"] for entry in reject_shards),
            "tokenizer": tokenizer,
            "config": self.config.model_dump(mode="json"),
        }
        reasons: dict[str, int] = {}
        for source in per_source.values():
            for reason, count in source["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + count
        report = {
            "read": sum(read.values()),
            "written": rows,
            "rejected": sum(reasons.values()),
            "reasons": dict(sorted(reasons.items())),
            "sources": per_source,
            "balanced": not problems,
        }
        write_json(join(self.config.output, "build_report.json"), report)
        if problems:
            raise BuildError("rows were lost: " + "; ".join(problems))
        write_json(join(self.config.output, "manifest.json"), manifest)
        yield report


def _nest(pairs) -> dict[str, dict[str, int]]:
    nested: dict[str, dict[str, int]] = {}
    for (outer, inner), count in pairs:
        nested.setdefault(outer, {})[inner] = count
    return nested


# --------------------------------------------------------------------------------------------
# The whole pipeline. Small named functions instead of lambdas: everything shipped to workers
# is importable by name.


def caption_of(record: dict[str, Any]) -> str:
    return record["caption"]


def has_image(record: dict[str, Any]) -> bool:
    return record["kind"] != "text"


def is_text_only(record: dict[str, Any]) -> bool:
    return record["kind"] == "text"


def has_caption(record: dict[str, Any]) -> bool:
    return "caption" in record


def source_of(record: dict[str, Any]) -> str:
    return record["source"]


def source_and_kind(record: dict[str, Any]) -> tuple[str, str]:
    return record["source"], record["kind"]


def source_and_reason(record: dict[str, Any]) -> tuple[str, str]:
    return record["source"], record["reason"]


def build_pipeline(pipeline: beam.Pipeline, config: DataConfig, files, given_model: Optional[bytes]) -> None:
    read = pipeline | "ReadSources" >> ReadSources(config, files)
    cleaned = read.records | "CleanText" >> beam.ParDo(CleanText(config)).with_outputs(REJECTED, main="records")

    with_image = cleaned.records | "HasImage" >> beam.Filter(has_image)
    text_only = cleaned.records | "TextOnly" >> beam.Filter(is_text_only)
    unique_urls = with_image | "DedupUrl" >> DedupBy(url_key, "url")
    unique_texts = text_only | "DedupText" >> DedupBy(text_key, "text")

    downloaded = unique_urls.records | "DownloadImages" >> DownloadImages(config)
    unique_images = downloaded.records | "DedupImage" >> DedupBy(image_key, "image")

    kept = (unique_images.records, unique_texts.records) | "Kept" >> beam.Flatten()
    with_text = kept | "WithText" >> beam.Filter(has_caption)
    model = with_text | "Tokenizer" >> TrainTokenizer(config, given_model)
    rows = kept | "Tokenize" >> beam.ParDo(Tokenize(config.text.max_tokens), beam.pvalue.AsSingleton(model))

    rejects = (
        read[REJECTED],
        cleaned[REJECTED],
        unique_urls[REJECTED],
        unique_texts[REJECTED],
        downloaded[REJECTED],
        unique_images[REJECTED],
    ) | "AllRejects" >> beam.Flatten()

    shards = rows | "WriteShards" >> WriteShards(config, kind_folder)
    reject_shards = rejects | "WriteRejects" >> WriteShards(config, rejects_folder)

    read_counts = (
        (read.records, read[REJECTED])
        | "AllRead" >> beam.Flatten()
        | "ReadSource" >> beam.Map(source_of)
        | "CountRead" >> beam.combiners.Count.PerElement()
    )
    written_counts = (
        rows
        | "WrittenKey" >> beam.Map(source_and_kind)
        | "CountWritten" >> beam.combiners.Count.PerElement()
    )
    reject_counts = (
        rejects
        | "RejectKey" >> beam.Map(source_and_reason)
        | "CountRejects" >> beam.combiners.Count.PerElement()
    )
    (
        pipeline
        | "Once" >> beam.Create([None])
        | "Finalize" >> beam.ParDo(
            Finalize(config),
            beam.pvalue.AsList(shards),
            beam.pvalue.AsList(reject_shards),
            beam.pvalue.AsList(read_counts),
            beam.pvalue.AsList(written_counts),
            beam.pvalue.AsList(reject_counts),
            beam.pvalue.AsSingleton(model),
        )
    )


def prepare_output(output: str, overwrite: bool) -> None:
    """Refuse to mix with an earlier build unless asked; with overwrite, remove only our entries."""
    fs, path = fsspec.core.url_to_fs(output)
    if not fs.exists(path):
        fs.makedirs(path, exist_ok=True)
        return
    present = [entry for entry in OUTPUT_ENTRIES if fs.exists(join(path, entry))]
    if present and not overwrite:
        raise BuildError(
            f"{output} already holds a build ({', '.join(present)}); pass --overwrite to replace it"
        )
    for entry in present:
        fs.rm(join(path, entry), recursive=True)


def run(config: Config, beam_args: list[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Validate sources, run the pipeline, and return the build report (with timing)."""
    data = config.data
    if data is None:
        raise BuildError("the config has no data: section (sources, output, ...) to build")
    files: list[tuple[int, SourceFile]] = []
    for index, source in enumerate(data.sources):
        try:
            source_files = expand_source(source)
        except SourceError as error:
            raise BuildError(str(error)) from None
        files.extend((index, source_file) for source_file in source_files)
        log.info("source %s (%s): %d file(s)", source.name, source.kind, len(source_files))
    given_model = None
    if data.tokenizer.model:
        try:
            with fsspec.open(data.tokenizer.model, "rb") as handle:
                given_model = handle.read()
            Tokenizer(given_model, 1)
        except (OSError, RuntimeError) as error:
            raise BuildError(f"tokenizer.model {data.tokenizer.model}: cannot load ({error})") from None
    prepare_output(data.output, overwrite)

    options = PipelineOptions(beam_args or [])
    started = time.monotonic()
    log.info("building %s with %d source file(s)", data.output, len(files))
    with beam.Pipeline(options=options) as pipeline:
        build_pipeline(pipeline, data, files, given_model)
    wall = time.monotonic() - started

    report_url = join(data.output, "build_report.json")
    with fsspec.open(report_url, "r") as handle:
        report = json.load(handle)
    images = report["written"].get("paired", 0) + report["written"].get("image", 0)
    report["wall_time_s"] = round(wall, 3)
    report["images_per_s"] = round(images / wall, 2) if wall > 0 else None
    report["rows_per_s"] = round(report["read"] / wall, 2) if wall > 0 else None
    write_json(report_url, report)
    return report
