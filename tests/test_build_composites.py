"""Each composite of the build on its own, under Beam's TestPipeline with assert_that."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from mmae.pipelines.builder import staging
from mmae.pipelines.builder.dedup import ENTRY, KEYS, FindDuplicates, HashPacker, url_key
from mmae.pipelines.builder.download import CAPTIONS, DownloadChunks
from mmae.pipelines.builder.plan import make_plan
from mmae.pipelines.builder.read import ReadChunks
from mmae.pipelines.builder.records import ChunkCount, ChunkKey, ChunkRows, Packed, row_id
from mmae.pipelines.builder.write import REJECTS, SplitIntoShardsFn, WriteShards
from mmae.schemas.config import DataConfig

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


def stage_inputs(config: DataConfig, chunks: dict[tuple, list[dict]]) -> list[ChunkRows]:
    """Write chunk input files as ReadChunks would; return its main output for them."""
    for key, records in chunks.items():
        staging.write_input(staging.input_url(config.output, config.sources[key[0]].name, ChunkKey(*key)), records)
    return [ChunkRows(ChunkKey(*key), len(records)) for key, records in chunks.items()]


def paired(row: int, url: str, caption: str = "a caption") -> dict:
    key = f"p.jsonl:{row}"
    return {"id": row_id("p", key), "source": "p", "kind": "paired", "key": key, "url": url, "caption": caption,
            "label": None}


def _entries(element):
    bucket, (chunk, what, packed) = element
    return chunk, what, [index for _, index, _ in ENTRY.iter_unpack(packed)]


def test_read_chunks_writes_each_chunks_records_in_input_order(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"url": "a.jpg", "caption": "one two"}, b"{bad\n",
                                       {"url": "b.jpg", "caption": "three four"}, {"url": "c.jpg", "caption": "five"},
                                       {"url": "d.jpg", "caption": "\u200b "}])
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    config = data_config(tmp_path, text={"min_words": 2})
    plan = make_plan(config)
    with beam_pipeline() as pipeline:
        read = pipeline | ReadChunks(config, plan.units(), plan.chunk_rows, plan.buckets)
        assert_that(read.chunks, equal_to([((0, 0, 0), 2), ((0, 0, 1), 2), ((0, 0, 2), 1), ((1, 0, 0), 1)]))
        # Only rows that may be fetched are hashed for dedup: one packed string per chunk and bucket.
        assert_that(read[KEYS] | beam.Map(_entries), equal_to([
            ((0, 0, 0), "url", [0]), ((0, 0, 1), "url", [0]), ((1, 0, 0), "text", [0])]), label="keys")
    inputs = tmp_path / "out" / "staging" / "inputs"
    chunks = [staging.read_input(str(path)) for path in sorted((inputs / "p").glob("*.jsonl.gz"))]
    assert [[(row["key"], row.get("reason"), row.get("caption")) for row in chunk] for chunk in chunks] == [
        [("p.jsonl:1", None, "one two"), ("p.jsonl:2", "bad_row", None)],
        [("p.jsonl:3", None, "three four"), ("p.jsonl:4", "too_few_words", None)],
        [("p.jsonl:5", "empty_caption", None)],
    ]


def test_read_chunks_keeps_malformed_csv_rows_in_their_place(tmp_path):
    (tmp_path / "p.csv").write_text("url,caption\na.jpg,one caption\nb.jpg,two,extra\nc.jpg,three caption\n")
    config = data_config(tmp_path, sources=[{"name": "p", "kind": "paired", "path": str(tmp_path / "p.csv")}])
    plan = make_plan(config)
    assert plan.total_rows == 3
    with beam_pipeline() as pipeline:
        read = pipeline | ReadChunks(config, plan.units(), plan.chunk_rows, plan.buckets)
        assert_that(read.chunks, equal_to([((0, 0, 0), 2), ((0, 0, 1), 1)]))
    first = staging.read_input(str(tmp_path / "out" / "staging" / "inputs" / "p" / "00000-000000.jsonl.gz"))
    assert [(row["key"], row.get("reason")) for row in first] == [("p.csv:1", None), ("p.csv:2", "bad_row")]
    assert "line 3: expected 2 columns, got 3" in first[1]["detail"]


def test_find_duplicates_names_later_copies_whatever_the_arrival_order():
    ids = [row_id("s", f"f:{row}") for row in range(4)]
    packs = []
    for chunk, rows in [((0, 0, 1), [(0, "x", 2), (1, "x", 3)]), ((0, 0, 0), [(0, "y", 0), (1, "x", 1)])]:
        packer = HashPacker(buckets=3)
        for index, url, row in rows:
            packer.add(url_key({"source": "s", "url": url}), index, ids[row])
        packs += [(bucket, Packed(ChunkKey(*chunk), "url", packed)) for bucket, packed in packer.items()]
    with beam_pipeline() as pipeline:
        duplicates = pipeline | beam.Create(packs) | FindDuplicates()
        assert_that(duplicates, equal_to([((0, 0, 1), [(0, f"same url as {ids[1]}"), (1, f"same url as {ids[1]}")])]))


def test_download_rejects_duplicates_without_fetching(tmp_path, http_server):
    config = data_config(tmp_path)
    chunks = stage_inputs(config, {(0, 0, 0): [paired(1, f"{http_server}/slow"), paired(2, f"{http_server}/slow")]})
    with beam_pipeline() as pipeline:
        duplicates = pipeline | "Duplicates" >> beam.Create([(ChunkKey(0, 0, 0), [(0, "same url as x"),
                                                                                  (1, "same url as x")])])
        staged = pipeline | beam.Create(chunks) | DownloadChunks(config, duplicates)
        assert_that(staged.summaries, equal_to([((0, 0, 0), 2, 0)]))
    rows = pq.read_table(tmp_path / "out" / "staging" / "chunks" / "p" / "00000-000000.parquet").to_pylist()
    assert [(row["reason"], row["detail"]) for row in rows] == [("duplicate", "same url as x")] * 2


def test_duplicate_images_are_found_after_download(tmp_path, http_server):
    config = data_config(tmp_path)
    records = [paired(row, f"{http_server}{path}", caption) for row, path, caption in [
        (1, "/img/red.jpg?a", "red"), (2, "/img/blue.jpg", "blue"),
        (3, "/img/red.jpg?b", "red"), (4, "/img/red.jpg?c", "another caption")]]
    chunks = stage_inputs(config, {(0, 0, 0): records[:2], (0, 0, 1): records[2:]})
    with beam_pipeline() as pipeline:
        staged = pipeline | beam.Create(chunks) | DownloadChunks(config)
        duplicates = staged[KEYS] | FindDuplicates()
        assert_that(duplicates, equal_to([((0, 0, 1), [(0, f"same image as {records[0]['id']}")])]))


def test_download_chunks_commits_staging_and_emits_only_metadata(tmp_path, http_server):
    config = data_config(tmp_path)
    records = [paired(row, f"{http_server}{path}", f"caption {row}")
               for row, path in [(1, "/img/red.jpg"), (2, "/status/404"), (3, "/img/blue.jpg")]]
    chunks = stage_inputs(config, {(0, 0, 0): records[:2], (0, 0, 1): records[2:]})
    with beam_pipeline() as pipeline:
        staged = pipeline | beam.Create(chunks) | DownloadChunks(config)
        # Per chunk: (chunk, rows, rows stored); the images stay in the staging file.
        assert_that(staged.summaries, equal_to([((0, 0, 0), 2, 1), ((0, 0, 1), 1, 1)]))
        # Captions leave as the tokenizer's partial sample, one element per bundle.
        assert_that(staged[CAPTIONS] | beam.FlatMap(dict.values), equal_to(["caption 1", "caption 3"]),
                    label="captions")
    committed = sorted((tmp_path / "out" / "staging" / "chunks" / "p").glob("*.parquet"))
    assert [path.name for path in committed] == ["00000-000000.parquet", "00000-000001.parquet"]
    first = pq.read_table(committed[0]).to_pylist()
    assert [(row["id"], row["reason"], row["image"] is not None) for row in first] == [
        (records[0]["id"], None, True), (records[1]["id"], "http_404", False)]


def test_split_into_shards_lays_kinds_out_in_input_order():
    counts = [ChunkCount("paired", ChunkKey(0, 0, 1), 4), ChunkCount("paired", ChunkKey(0, 0, 0), 3),
              ChunkCount("text", ChunkKey(1, 0, 0), 2)]
    with beam_pipeline() as pipeline:
        pieces = pipeline | beam.Create(counts) | beam.ParDo(SplitIntoShardsFn(rows_per_shard=5), counts)
        assert_that(pieces, equal_to([
            (("paired", 0, 2), ((0, 0, 0), 0, 3)),
            (("paired", 0, 2), ((0, 0, 1), 0, 2)),
            (("paired", 1, 2), ((0, 0, 1), 2, 4)),
            (("text", 0, 1), ((1, 0, 0), 0, 2)),
        ]))


def test_write_shards_streams_rows_from_staging(tmp_path, http_server):
    config = data_config(tmp_path, shards={"rows_per_shard": 2, "rows_per_row_group": 1})
    records = [paired(row, f"{http_server}{path}", f"a {row} square") for row, path in [
        (1, "/img/red.jpg"), (2, "/img/blue.jpg"), (3, "/status/404"), (4, "/img/green.jpg"), (5, "/img/red.jpg?again")]]
    records[4]["caption"] = records[0]["caption"]  # the same image and caption: a duplicate
    chunks = stage_inputs(config, {(0, 0, 0): records[:2], (0, 0, 1): records[2:4], (0, 0, 2): records[4:]})
    with beam_pipeline() as pipeline:
        staged = pipeline | beam.Create(chunks) | DownloadChunks(config)
        model = pipeline | "Model" >> beam.Create([b""])
        written = staged.summaries | WriteShards(config, staged[KEYS] | FindDuplicates(), model)
        assert_that(written["shards"] | beam.Map(lambda entry: (entry["path"], entry["rows"], entry["sources"])),
                    equal_to([("paired/part-00000-of-00002.parquet", 2, {"p": 2}),
                              ("paired/part-00001-of-00002.parquet", 1, {"p": 1})]))
        assert_that(written[REJECTS] | beam.Map(lambda entry: (entry["path"], entry["rows"], entry["reasons"])),
                    equal_to([("rejects/part-00000-of-00001.parquet", 2, {"p": {"http_404": 1, "duplicate": 1}})]),
                    label="rejects")
    out = tmp_path / "out"
    rows = [row for part in ("part-00000-of-00002", "part-00001-of-00002")
            for row in pq.read_table(out / "paired" / f"{part}.parquet").to_pylist()]
    assert [row["id"] for row in rows] == [records[index]["id"] for index in (0, 1, 3)]
    assert all(row["image"][:2] == b"\xff\xd8" and row["tokens"] is None for row in rows)
    assert pq.ParquetFile(out / "paired" / "part-00000-of-00002.parquet").metadata.num_row_groups == 2
    rejects = pq.read_table(out / "rejects" / "part-00000-of-00001.parquet").to_pylist()
    assert [(row["id"], row["reason"], row["url"]) for row in rejects] == [
        (records[2]["id"], "http_404", records[2]["url"]), (records[4]["id"], "duplicate", records[4]["url"])]
    assert rejects[1]["detail"] == f"same image as {records[0]['id']}"
    assert not list(out.rglob(".tmp-*"))


def test_read_chunks_rejects_a_lone_surrogate_instead_of_failing(tmp_path):
    # JSON can spell a lone surrogate; no Parquet file can store it.
    (tmp_path / "p.jsonl").write_text('{"url": "a.jpg", "caption": "bad \\ud800 text"}\n'
                                      '{"url": "b.jpg", "caption": "good text"}\n')
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    config = data_config(tmp_path)
    plan = make_plan(config)
    with beam_pipeline() as pipeline:
        read = pipeline | ReadChunks(config, plan.units(), plan.chunk_rows, plan.buckets)
        assert_that(read.chunks, equal_to([((0, 0, 0), 2), ((1, 0, 0), 1)]))
    rows = staging.read_input(str(tmp_path / "out" / "staging" / "inputs" / "p" / "00000-000000.jsonl.gz"))
    assert [(row["key"], row.get("reason")) for row in rows] == [("p.jsonl:1", "invalid_utf8"), ("p.jsonl:2", None)]


def test_a_chunk_committed_from_part_tables_is_in_input_order(tmp_path):
    # Rows finish in any order and are saved in parts; the commit lays them out by position,
    # and refuses a position missing or twice (a lost or doubled row never reaches a shard).
    import pytest

    rows = [{**paired(index, f"http://x/{index}.jpg"), "reason": "http_404", "detail": ""} for index in range(5)]
    parts = [staging.part_table([(3, rows[3]), (0, rows[0])]), staging.part_table([(4, rows[4])]),
             staging.part_table([(1, rows[1]), (2, rows[2])])]
    url = str(tmp_path / "chunk.parquet")
    staging.write_chunk(url, parts, 5, "digest")
    assert [row["key"] for row in staging.read_chunk(url, "digest")] == [row["key"] for row in rows]
    assert staging.read_chunk(url, "another digest") is None
    for broken in (parts[:2], parts + [staging.part_table([(2, rows[2])])]):
        with pytest.raises(ValueError, match="positions"):
            staging.write_chunk(str(tmp_path / "broken.parquet"), broken, 5, "digest")
    assert not (tmp_path / "broken.parquet").exists()


def test_a_big_uncompressed_table_is_read_in_spans_that_give_its_rows_once(tmp_path, monkeypatch):
    """Spans start at chunk boundaries (one chunk each, up to plan.MAX_SPANS, then joined runs of
    chunks) and keep the file's line and row numbers, blank and over-long lines included; a gzip
    is read whole."""
    import gzip

    from mmae.pipelines.builder import plan as plans
    from mmae.pipelines.builder.readers import read_source_file
    from mmae.pipelines.builder.sources import expand_source

    lines = []
    for number in range(1, 60):
        lines.append(f'{{"url": "{number}.jpg", "caption": "caption number {number}"}}')
        if number % 7 == 0:
            lines.append("")  # blank: not a row, but a line
        if number == 23:
            lines.append('{"url": "long.jpg", "caption": "' + "x" * 3000 + '"}')  # over the cap below
    csv_lines = ["url,caption"] + [f"{n}.jpg,caption {n}" if n % 9 else "" for n in range(1, 50)]
    files = {"p.jsonl": "\n".join(lines) + "\n", "p.txt": "\n".join(f"text {n}" if n % 5 else "" for n in range(60)),
             "p.csv": "\n".join(csv_lines) + "\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(files["p.jsonl"].encode()))
    for name in files.keys() | {"p.jsonl.gz"}:
        kind = "text" if name.endswith(".txt") else "paired"
        config = data_config(tmp_path, sources=[{"name": "p", "kind": kind, "path": str(tmp_path / name)}],
                             text={"max_chars": 64})
        plan = make_plan(config)
        source, (planned,) = config.sources[0], plan.files
        whole = [(row["key"], row.get("reason")) for row in read_source_file(source, expand_source(source)[0], 2048)]
        if name.endswith(".gz"):
            assert planned.spans == () and len(plan.units()) == 1
            continue
        assert len(planned.spans) == plan.total_chunks > 2, name
        pieces = [[(row["key"], row.get("reason")) for row in read_source_file(source, planned.file, 2048, span)]
                  for span in planned.spans]
        assert [row for piece in pieces for row in piece] == whole, name
        with monkeypatch.context() as patched:  # a file of more chunks than spans allowed: runs of chunks
            patched.setattr(plans, "MAX_SPANS", 2)
            (joined,) = make_plan(config).files
            assert len(joined.spans) == 2, name
            assert joined.spans[0].offset == planned.spans[0].offset and joined.spans[-1].end == -1
            assert [(row["key"], row.get("reason")) for span in joined.spans
                    for row in read_source_file(source, joined.file, 2048, span)] == whole, name
        assert len(plan.units()) == len(planned.spans)
        with beam_pipeline() as pipeline:
            read = pipeline | ReadChunks(config, plan.units(), plan.chunk_rows, plan.buckets)
            assert_that(read.chunks | beam.Map(lambda chunk: (tuple(chunk.chunk), chunk.rows)),
                        equal_to([(tuple(key), rows) for key, rows in plan.chunk_input_rows.items()]))
        staged = [row["key"] for path in sorted((tmp_path / "out" / "staging" / "inputs" / "p").glob("*.jsonl.gz"))
                  for row in staging.read_input(str(path))]
        assert staged == [key for key, _ in whole], name
        import shutil
        shutil.rmtree(tmp_path / "out")
