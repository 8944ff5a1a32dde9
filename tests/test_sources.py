"""Reading sources: formats, stable ids, URL resolution, and rows that cannot be used."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mmae.pipelines.builder.readers import read_source_file
from mmae.pipelines.builder.records import row_id
from mmae.pipelines.builder.sources import SourceError, expand_source
from mmae.schemas.config import SourceConfig

from tests.conftest import write_jsonl


def read_all(source: SourceConfig) -> list[dict]:
    return [record for source_file in expand_source(source) for record in read_source_file(source, source_file)]


def test_jsonl_rows_and_bad_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"url": "a.jpg", "caption": "a red circle", "label": "circle"},
            b'{"url": "b.jpg", "caption": "bad \xff\xfe bytes"}\n',  # invalid UTF-8
            {"caption": "no url here"},
            {"url": "c.jpg"},
            b"{not json\n",
            b"\n",  # blank lines are not rows
            b"[1, 2]\n",
        ],
    )
    records = read_all(SourceConfig(name="s", kind="paired", path=str(path), label_column="label"))
    assert [record.get("reason") for record in records] == [
        None, "invalid_utf8", "missing_column", "missing_column", "bad_row", "bad_row"
    ]
    first = records[0]
    assert first["url"] == str(tmp_path / "a.jpg")  # relative to the file's folder
    assert first["label"] == "circle" and first["caption"] == "a red circle"
    assert first["key"] == "pairs.jsonl:1" and first["id"] == row_id("s", "pairs.jsonl:1")
    assert records[1]["key"] == "pairs.jsonl:2"


def test_ids_are_stable_and_distinct():
    assert row_id("a", "f.jsonl:1") == row_id("a", "f.jsonl:1")
    assert len({row_id("a", "f.jsonl:1"), row_id("a", "f.jsonl:2"), row_id("b", "f.jsonl:1")}) == 3


def test_base_url_and_absolute_urls(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"url": "img/1.jpg", "caption": "x"},
                                              {"url": "https://cdn.example/2.jpg", "caption": "y"}])
    records = read_all(SourceConfig(name="s", kind="paired", path=str(path), base_url="http://mirror:8000/data"))
    assert [record["url"] for record in records] == ["http://mirror:8000/data/img/1.jpg", "https://cdn.example/2.jpg"]


def test_csv_tsv_parquet_and_gzip(tmp_path):
    (tmp_path / "a.csv").write_bytes(b'url,caption\nx.jpg,"a, quoted caption"\ny.jpg,bad \xff utf8\nz.jpg\n')
    (tmp_path / "b.tsv").write_text("url\tcaption\nq.jpg\tplain\n")
    pq.write_table(pa.table({"url": ["p.jpg"], "caption": ["from parquet"]}), tmp_path / "c.parquet")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"url": "g.jpg", "caption": "gzipped"}) + "\n")
    source = SourceConfig(name="s", kind="paired", path=str(tmp_path / "*"))
    records = read_all(source)
    by_key = {record["key"]: record for record in records}
    assert by_key["a.csv:1"]["caption"] == "a, quoted caption"
    assert by_key["a.csv:2"]["reason"] == "invalid_utf8"
    assert any(record.get("reason") == "bad_row" for record in records)  # the row with one column
    assert by_key["b.tsv:1"]["caption"] == "plain"
    assert by_key["c.parquet:1"]["caption"] == "from parquet"
    assert by_key["d.jsonl.gz:1"]["caption"] == "gzipped"


def test_text_and_image_folder_sources(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"body": "wrong column"}])
    records = read_all(SourceConfig(name="t", kind="text", path=str(path)))
    assert records[0]["caption"] == "hello world" and "url" not in records[0]
    assert records[1]["reason"] == "missing_column"
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    records = read_all(SourceConfig(name="f", kind="image", path=str(tmp_path / "imgs")))
    assert [(record["key"], record["url"]) for record in records] == [("sub/a.jpg", str(tmp_path / "imgs/sub/a.jpg"))]


def test_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        expand_source(SourceConfig(name="s", kind="paired", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(SourceError, match="no files match"):
        expand_source(SourceConfig(name="s", kind="paired", path=str(tmp_path / "*.jsonl")))
    (tmp_path / "a.csv").write_text("link,caption\nx,y\n")
    with pytest.raises(SourceError, match="no column"):
        expand_source(SourceConfig(name="s", kind="paired", path=str(tmp_path / "a.csv")))
    with pytest.raises(SourceError, match="unknown file type"):
        (tmp_path / "a.xml").write_text("<x/>")
        expand_source(SourceConfig(name="s", kind="paired", path=str(tmp_path / "a.xml")))
