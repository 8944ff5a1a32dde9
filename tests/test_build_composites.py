"""Each composite of the build on its own, under Beam's TestPipeline with assert_that."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.builder.dedup import DedupImages, FindDuplicates, url_key
from pipelines.builder.download import CAPTIONS, REJECTED, DownloadChunks
from pipelines.builder.plan import make_plan
from pipelines.builder.read import CleanText, ReadSources
from pipelines.builder.write import SplitIntoShardsFn, WriteShards
from schemas.config import DataConfig
from tests.conftest import write_jsonl


def beam_pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(options=PipelineOptions(["--auto_unique_labels"]))


def data_config(tmp_path: Path, **extra) -> DataConfig:
    return DataConfig.model_validate({
        "output": str(tmp_path / "out"),
        "sources": [{"name": "p", "kind": "paired", "path": str(tmp_path / "p.jsonl")},
                    {"name": "t", "kind": "text", "path": str(tmp_path / "t.jsonl")}],
        "download": {"allowed_networks": ["127.0.0.1/32"], "threads": 4, "timeout_s": 2, "retries": 0},
        "image": {"size": 32, "min_size": 16},
        "chunk_rows": 2,
        **extra,
    })


def _id_and(field):
    def pick(record):
        return record["id"], record[field]
    return pick


def _key(record):
    return record["key"]


def test_read_sources_gives_every_row_its_input_order(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"url": "a.jpg", "caption": "one"}, b"{bad\n", {"url": "b.jpg", "caption": "two"}])
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    config = data_config(tmp_path)
    with beam_pipeline() as pipeline:
        read = pipeline | ReadSources(config, make_plan(config).elements())
        orders = read.records | beam.Map(lambda record: (record["key"], record["order"]))
        assert_that(orders, equal_to([("p.jsonl:1", (0, 0, 1)), ("p.jsonl:3", (0, 0, 3)), ("t.jsonl:1", (1, 0, 1))]))
        reasons = read["rejected"] | beam.Map(lambda record: (record["key"], record["reason"]))
        assert_that(reasons, equal_to([("p.jsonl:2", "bad_row")]), label="rejects")


def test_clean_text_rejects_empty_and_short_captions(tmp_path):
    config = data_config(tmp_path, text={"min_words": 2})
    base = {"source": "p", "kind": "paired", "url": "u"}
    records = [
        {**base, "id": "1", "key": "k1", "caption": "  two\twords "},
        {**base, "id": "2", "key": "k2", "caption": "\u200b "},
        {**base, "id": "3", "key": "k3", "caption": "one"},
    ]
    with beam_pipeline() as pipeline:
        cleaned = pipeline | beam.Create(records) | CleanText(config)
        assert_that(cleaned.records | beam.Map(_id_and("caption")), equal_to([("1", "two words")]))
        assert_that(cleaned["rejected"] | beam.Map(_id_and("reason")),
                    equal_to([("2", "empty_caption"), ("3", "too_few_words")]), label="rejects")


def test_find_duplicates_names_later_copies_whatever_the_arrival_order():
    records = [
        {"id": f"r{row}", "source": "s", "kind": "paired", "key": f"f:{row}", "url": url, "order": (0, 0, row)}
        for row, url in [(5, "x"), (2, "x"), (9, "y"), (7, "x")]
    ]
    with beam_pipeline() as pipeline:
        duplicates = pipeline | beam.Create(records) | FindDuplicates(url_key, "url")
        assert_that(duplicates, equal_to([("r5", "same url as r2"), ("r7", "same url as r2")]))


def test_download_rejects_duplicates_without_fetching(tmp_path, http_server):
    config = data_config(tmp_path)
    records = [
        {"id": f"i{row}", "source": "p", "kind": "paired", "key": f"p.jsonl:{row}", "url": f"{http_server}/slow",
         "caption": "c", "label": None, "order": (0, 0, row)} for row in (1, 2)
    ]
    with beam_pipeline() as pipeline:
        duplicates = pipeline | "Duplicates" >> beam.Create([("i1", "same url as i0"), ("i2", "same url as i0")])
        staged = pipeline | beam.Create(records) | DownloadChunks(config, duplicates)
        assert_that(staged[REJECTED] | beam.Map(_id_and("reason")), equal_to([("i1", "duplicate"), ("i2", "duplicate")]))


def test_dedup_images_keeps_the_first_and_rejects_copies_with_key_and_url(tmp_path, http_server):
    config = data_config(tmp_path)
    records = [
        {"id": f"i{row}", "source": "p", "kind": "paired", "key": f"p.jsonl:{row}", "url": f"{http_server}{path}",
         "caption": caption, "label": None, "order": (0, 0, row)}
        for row, path, caption in [(1, "/img/red.jpg?a", "red"), (2, "/img/blue.jpg", "blue"),
                                   (3, "/img/red.jpg?b", "red"), (4, "/img/red.jpg?c", "another caption")]
    ]
    text = {"id": "t1", "source": "t", "kind": "text", "key": "t.jsonl:1", "caption": "hello", "label": None,
            "order": (1, 0, 1)}
    with beam_pipeline() as pipeline:
        staged = pipeline | beam.Create(records + [text]) | DownloadChunks(config)
        result = staged.candidates | DedupImages(config)
        assert_that(result["records"] | beam.Map(lambda candidate: candidate[2]), equal_to(["i1", "i2", "i4", "t1"]))
        assert_that(result["rejected"] | beam.Map(lambda row: (row["id"], row["key"], row["url"], row["detail"])),
                    equal_to([("i3", "p.jsonl:3", f"{http_server}/img/red.jpg?b", "same image as i1")]),
                    label="rejects")


def test_download_chunks_commits_staging_and_emits_only_metadata(tmp_path, http_server):
    config = data_config(tmp_path)
    records = [
        {"id": f"i{row}", "source": "p", "kind": "paired", "key": f"p.jsonl:{row}", "url": f"{http_server}{path}",
         "caption": f"caption {row}", "label": None, "order": (0, 0, row)}
        for row, path in [(1, "/img/red.jpg"), (2, "/status/404"), (3, "/img/blue.jpg")]
    ]
    with beam_pipeline() as pipeline:
        staged = pipeline | beam.Create(records) | DownloadChunks(config)
        # Candidates are small: (dedup key, position, id); the image stays in the staging file.
        assert_that(staged.candidates | beam.Map(lambda c: (c[2], c[1], len(c[0]))),
                    equal_to([("i1", (0, 0, 0, 0), 16), ("i3", (0, 0, 1, 0), 16)]))
        assert_that(staged[REJECTED] | beam.Map(_id_and("reason")), equal_to([("i2", "http_404")]), label="rejects")
        assert_that(staged[CAPTIONS], equal_to(["caption 1", "caption 3"]), label="captions")
    chunks = sorted((tmp_path / "out" / "staging" / "chunks" / "p").glob("*.parquet"))
    assert [path.name for path in chunks] == ["00000-000000.parquet", "00000-000001.parquet"]
    first = pq.read_table(chunks[0]).to_pylist()
    assert [(row["id"], row["reason"], row["image"] is not None) for row in first] == [
        ("i1", None, True), ("i2", "http_404", False)]


def test_split_into_shards_lays_kinds_out_in_input_order():
    counts = [("paired", (0, 0, 0), 3), ("paired", (0, 0, 1), 4), ("text", (1, 0, 0), 2)]
    with beam_pipeline() as pipeline:
        pieces = (
            pipeline
            | beam.Create([("paired", (0, 0, 1), [0, 1, 3, 4]), ("paired", (0, 0, 0), [0, 2, 5]), ("text", (1, 0, 0), [0, 1])])
            | beam.ParDo(SplitIntoShardsFn(rows_per_shard=5), counts)
        )
        assert_that(pieces, equal_to([
            (("paired", 0, 2), ((0, 0, 0), [0, 2, 5])),
            (("paired", 0, 2), ((0, 0, 1), [0, 1])),
            (("paired", 1, 2), ((0, 0, 1), [3, 4])),
            (("text", 0, 1), ((1, 0, 0), [0, 1])),
        ]))


def test_write_shards_streams_rows_from_staging(tmp_path, http_server):
    config = data_config(tmp_path, shards={"rows_per_shard": 2, "rows_per_row_group": 1})
    records = [
        {"id": f"i{row}", "source": "p", "kind": "paired", "key": f"p.jsonl:{row}",
         "url": f"{http_server}/img/{name}.jpg", "caption": f"a {name} square", "label": None, "order": (0, 0, row)}
        for row, name in [(1, "red"), (2, "blue"), (3, "green")]
    ]
    with beam_pipeline() as pipeline:
        staged = pipeline | beam.Create(records) | DownloadChunks(config)
        model = pipeline | "Model" >> beam.Create([b""])
        entries = staged.candidates | WriteShards(config, model)
        assert_that(entries | beam.Map(lambda entry: (entry["path"], entry["rows"], entry["sources"])), equal_to([
            ("paired/part-00000-of-00002.parquet", 2, {"p": 2}),
            ("paired/part-00001-of-00002.parquet", 1, {"p": 1}),
        ]))
    rows = [row for part in ("part-00000-of-00002", "part-00001-of-00002")
            for row in pq.read_table(tmp_path / "out" / "paired" / f"{part}.parquet").to_pylist()]
    assert [row["id"] for row in rows] == ["i1", "i2", "i3"]
    assert all(row["image"][:2] == b"\xff\xd8" and row["tokens"] is None for row in rows)
    assert pq.ParquetFile(tmp_path / "out" / "paired" / "part-00000-of-00002.parquet").metadata.num_row_groups == 2
    assert not list((tmp_path / "out").rglob(".tmp-*"))
