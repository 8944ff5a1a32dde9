"""No input row can kill a build or vanish: every line of every reader ends as a row or a reject
naming it, with memory bounded by the settings, and no file outside a folder source is read."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mmae.pipelines.builder.lines import lines
from mmae.pipelines.builder.plan import make_plan
from mmae.pipelines.builder.readers import read_source_file
from mmae.pipelines.builder.sources import expand_source
from mmae.pipelines.builder.text import clean_text
from mmae.schemas.config import DataConfig, SourceConfig

from tests.conftest import jpeg_bytes
from tests.datasets import corrupt_row_group
from tests.test_build_inputs import build, rejects, rows


def read_all(source: SourceConfig, cap: int = 1 << 20) -> list[dict]:
    return [record for source_file in expand_source(source) for record in read_source_file(source, source_file, cap)]


def planned_rows(tmp_path, sources: list[dict], **data) -> int:
    return make_plan(DataConfig(output=str(tmp_path / "out"), sources=sources, **data)).total_rows


HOSTILE_JSON = [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the interpreter's stack: RecursionError
    b'{"url": "a.jpg", "caption": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"url": "a.jpg", "caption": "x", "n": ' + b"9" * 50_000 + b"}",  # longer than int() converts
    b'{"url": "a.jpg", "caption": "\\ud800"}',  # a lone surrogate
    b'{"url": "a.jpg", "caption": 1e999999}',
    b'"just a string"',
    b'{"url": {"nested": 1}, "caption": "x"}',
    b'{"url": "a.jpg", "caption": "x", "label": [1, 2]}',
    b"\xef\xbb\xbf{}",
]


@pytest.mark.parametrize("line", HOSTILE_JSON, ids=range(len(HOSTILE_JSON)))
def test_any_jsonl_line_becomes_a_row_or_a_reject_naming_it(tmp_path, line):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"url": "ok.jpg", "caption": "fine"}\n' + line + b"\n" + b'{"url": "z.jpg", "caption": "after"}\n')
    source = SourceConfig(name="p", kind="paired", path=str(path))
    records = read_all(source)
    assert [record["key"] for record in records] == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"]
    assert "reason" not in records[0] and "reason" not in records[2]
    if "reason" in records[1]:
        assert records[1]["reason"] in ("bad_row", "bad_url", "bad_label", "bad_caption", "missing_column",
                                        "invalid_utf8")
        assert "0x" not in records[1]["detail"]


def test_a_hostile_jsonl_row_does_not_stop_the_build(tmp_path):
    images = tmp_path / "src"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes())
    lines_ = [b'{"url": "a.jpg", "caption": "a red square"}'] + HOSTILE_JSON
    (images / "p.jsonl").write_bytes(b"\n".join(lines_) + b"\n")
    report, output = build(tmp_path, [{"name": "p", "kind": "paired", "path": str(images / "p.jsonl")}])
    assert report["read"] == len(lines_) and report["balanced"]
    assert report["written"]["paired"] == 1
    assert report["rejected"] == len(HOSTILE_JSON)


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "csv", "tsv.gz"])
def test_a_line_longer_than_the_cap_is_rejected_without_being_held(tmp_path, suffix):
    long_caption = "word " * 2_000_000  # 10 MB on one line
    if suffix.startswith("jsonl"):
        body = "\n".join([json.dumps({"url": "a.jpg", "caption": "short"}),
                          json.dumps({"url": "b.jpg", "caption": long_caption}),
                          json.dumps({"url": "c.jpg", "caption": "also short"})]) + "\n"
    else:
        delimiter = "," if suffix.startswith("csv") else "\t"
        body = f"url{delimiter}caption\na.jpg{delimiter}short\nb.jpg{delimiter}{long_caption}\nc.jpg{delimiter}also short\n"
    path = tmp_path / f"p.{suffix}"
    path.write_bytes(gzip.compress(body.encode()) if suffix.endswith(".gz") else body.encode())
    source = SourceConfig(name="p", kind="paired", path=str(path))
    tracemalloc.start()
    records = read_all(source, cap=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [record.get("reason") for record in records] == [None, "row_too_long", None]
    assert "line" in records[1]["detail"] and "max_row_bytes" in records[1]["detail"]
    assert peak < 8 << 20, f"reading held {peak / 1e6:.0f} MB for a 10 MB line with a 1 MB cap"
    assert planned_rows(tmp_path, [{"name": "p", "kind": "paired", "path": str(path)}]) == 3


def test_line_reader_counts_every_line_and_skips_long_ones_in_pieces():
    data = b"a\n" + b"x" * 5000 + b"\nb\n\nc"
    assert list(lines(io.BytesIO(data), 100)) == [(1, b"a"), (2, None), (3, b"b"), (4, b""), (5, b"c")]


def test_cleaning_a_huge_caption_costs_what_is_kept():
    raw = " \u200b ".join(["caf\u0065\u0301"] * 3_000_000)  # 24 M characters, 96 MB as UCS-4
    tracemalloc.start()
    text = clean_text(raw, 2000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(text) <= 2000 and text.startswith("café café")
    assert peak < 1 << 20


def test_an_unclosed_quote_in_csv_costs_its_own_line_only(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('url,caption\na.jpg,"an open quote\nb.jpg,second\nc.jpg,"a, quoted" \nd.jpg,"fine, quoted"\n')
    source = SourceConfig(name="p", kind="paired", path=str(path))
    records = read_all(source)
    assert [(record["key"], record.get("reason"), record.get("caption")) for record in records] == [
        ("p.csv:1", "bad_row", None), ("p.csv:2", None, "second"), ("p.csv:3", "bad_row", None),
        ("p.csv:4", None, "fine, quoted")]
    assert records[0]["detail"].startswith("line 2:")
    assert planned_rows(tmp_path, [{"name": "p", "kind": "paired", "path": str(path)}]) == 4


def test_tsv_quotes_are_characters_unless_the_source_says_otherwise(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text('url\tcaption\na.jpg\t"Quoted" at the start\nb.jpg\tsays "hi\nc.jpg\t"x\ty"\n')
    plain = read_all(SourceConfig(name="p", kind="paired", path=str(path)))
    assert [record.get("caption") for record in plain] == ['"Quoted" at the start', 'says "hi', None]
    assert plain[2]["reason"] == "bad_row"  # three fields on a line of two columns
    quoted = read_all(SourceConfig(name="p", kind="paired", path=str(path), quoting="standard"))
    # Quoting on, a caption that starts with a quoted word is malformed (what web TSVs hit).
    assert [record.get("caption") for record in quoted] == [None, 'says "hi', "x\ty"]
    assert quoted[0]["reason"] == "bad_row"


def test_header_only_csv_and_blank_lines(tmp_path):
    (tmp_path / "empty.csv").write_text("url,caption\n")
    (tmp_path / "blank.jsonl").write_text('\n\n{"text": "one"}\n   \n{"text": "two"}\n\n')
    assert read_all(SourceConfig(name="e", kind="paired", path=str(tmp_path / "empty.csv"))) == []
    assert planned_rows(tmp_path, [{"name": "e", "kind": "paired", "path": str(tmp_path / "empty.csv")},
                                   {"name": "t", "kind": "text", "path": str(tmp_path / "blank.jsonl")}]) == 2
    keys = [record["key"] for record in read_all(SourceConfig(name="t", kind="text", path=str(tmp_path / "blank.jsonl")))]
    assert keys == ["blank.jsonl:3", "blank.jsonl:5"]


def test_a_damaged_parquet_row_group_is_rejects_naming_it(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(12)], "url": [f"{i}.jpg" for i in range(12)],
                      "caption": [f"caption number {i}" for i in range(12)]})
    pq.write_table(table, path, row_group_size=4, compression="zstd")
    corrupt_row_group(path, 1, "caption")
    records = read_all(SourceConfig(name="p", kind="paired", path=str(path)))
    assert len(records) == 12
    assert [record.get("reason") for record in records] == [None] * 4 + ["bad_row"] * 4 + [None] * 4
    assert all("row group 1" in record["detail"] for record in records[4:8])


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if isinstance(payload, tuple):  # (kind, target): a link
                info.type, info.linkname = payload
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_tar_samples_of_links_and_repeated_keys_are_all_counted(tmp_path):
    path = tmp_path / "s.tar"
    _tar(path, [("a.jpg", b"jpeg"), ("a.txt", b"first"), ("b.jpg", (tarfile.SYMTYPE, "/etc/passwd")),
                ("b.txt", (tarfile.LNKTYPE, "a.txt")), ("a.jpg", b"jpeg2"), ("a.txt", b"again")])
    source = SourceConfig(name="s", kind="paired", path=str(path))
    records = read_all(source)
    assert [record["key"] for record in records] == ["s.tar#a", "s.tar#b", "s.tar#a@2"]
    assert len({record["id"] for record in records}) == 3
    assert records[1]["reason"] == "missing_column" and "b.jpg (link)" in records[1]["detail"]
    assert [records[0]["caption"], records[2]["caption"]] == ["first", "again"]
    assert planned_rows(tmp_path, [{"name": "s", "kind": "paired", "path": str(path)}]) == 3


def test_image_folders_do_not_follow_links_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("root:x:0:0")
    (outside / "other.jpg").write_bytes(jpeg_bytes())
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes())
    (root / "a.txt").symlink_to(outside / "secret.txt")
    (root / "b.jpg").symlink_to(outside / "other.jpg")
    (root / "b.txt").write_text("a caption")
    (root / "c.jpg").write_bytes(jpeg_bytes())
    (root / "c.txt").symlink_to(root / "b.txt")  # a link inside the folder is fine
    source = {"name": "f", "kind": "paired", "path": str(root), "sidecar_captions": True}
    found = {record["key"]: (record.get("reason"), record.get("caption"))
             for record in read_all(SourceConfig(**source))}
    assert found == {"a.jpg": ("url_not_allowed", None), "b.jpg": ("url_not_allowed", None),
                     "c.jpg": (None, "a caption")}
    opted_in = {record["key"]: record.get("caption")
                for record in read_all(SourceConfig(**source, allow_local_files=True))}
    assert opted_in == {"a.jpg": "root:x:0:0", "b.jpg": "a caption", "c.jpg": "a caption"}


def test_folders_where_files_belong_are_not_a_file_and_leak_nothing(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for index in range(300):
        (root / f"{index}.jpg").write_bytes(b"x")
        (root / f"{index}.txt").mkdir()
    before = len(os.listdir("/proc/self/fd"))
    records = read_all(SourceConfig(name="f", kind="paired", path=str(root), sidecar_captions=True))
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    assert {record["reason"] for record in records} == {"not_a_file"}
    assert len(records) == 300


def test_a_folder_named_in_a_url_list_is_not_a_file(tmp_path):
    images = tmp_path / "src"
    (images / "folder.jpg").mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg_bytes())
    (images / "p.jsonl").write_text(json.dumps({"url": "a.jpg", "caption": "one"}) + "\n"
                                    + json.dumps({"url": "folder.jpg", "caption": "two"}) + "\n")
    report, output = build(tmp_path, [{"name": "p", "kind": "paired", "path": str(images / "p.jsonl")}])
    assert rejects(output) == {"p.jsonl:2": "not_a_file"}
    assert len(rows(output, "paired")) == 1


def test_reject_details_are_the_same_in_two_identical_builds(tmp_path):
    images = tmp_path / "src"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes())
    (images / "junk.jpg").write_bytes(b"this is not an image at all")
    (images / "p.jsonl").write_text(json.dumps({"url": "a.jpg", "caption": "fine"}) + "\n"
                                    + json.dumps({"url": "junk.jpg", "caption": "junk"}) + "\n")
    details = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        build(tmp_path / name, [{"name": "p", "kind": "paired", "path": str(images / "p.jsonl")}])
        details.append([row["detail"] for row in rows(tmp_path / name / "out", "rejects")])
    assert len(details[0]) == 1 and "cannot identify image file" in details[0][0]
    assert details[0] == details[1] and "0x" not in details[0][0]


def test_a_tar_json_member_nested_too_deep_is_that_samples_reject(tmp_path):
    path = tmp_path / "s.tar"
    _tar(path, [("a.jpg", b"jpeg"), ("a.txt", b"one"), ("a.json", b"[" * 100_000 + b"]" * 100_000),
                ("b.jpg", b"jpeg"), ("b.txt", b"two"), ("b.json", b'{"label": "ok"}')])
    records = read_all(SourceConfig(name="s", kind="paired", path=str(path), label_column="label"))
    assert [(record["key"], record.get("reason"), record.get("label")) for record in records] == [
        ("s.tar#a", "bad_row", None), ("s.tar#b", None, "ok")]


def test_inline_parquet_images_are_read_in_windows_in_any_order(tmp_path):
    from mmae.pipelines.builder import inline

    path = tmp_path / "images.parquet"
    payloads = [f"image {index}".encode() * 10 for index in range(200)]
    pq.write_table(pa.table({"jpg": payloads}), path, row_group_size=90)
    reader = inline.InlineImages(max_bytes=1 << 20)
    order = list(range(200)) + list(range(199, -1, -7)) + [5, 150, 6, 95, 0]
    for row in order:
        locator = {"parquet": str(path), "row": row, "column": "jpg"}
        assert reader.fetch(locator).data == payloads[row]
    assert len(reader._windows) <= inline.WINDOWS_KEPT


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.txt.gz"])
def test_a_plain_text_corpus_is_one_text_per_line(tmp_path, name):
    body = "\ufeffthe first text\n\nthe second text\n".encode() + b"bad \xff bytes\n" + b"the first text\nlast, no newline"
    path = tmp_path / name
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    source = {"name": "t", "kind": "text", "path": str(path)}
    records = read_all(SourceConfig(**source))
    assert [(record["key"], record.get("caption"), record.get("reason")) for record in records] == [
        (f"{name}:1", "the first text", None), (f"{name}:3", "the second text", None),
        (f"{name}:4", None, "invalid_utf8"), (f"{name}:5", "the first text", None), (f"{name}:6", "last, no newline", None)]
    assert planned_rows(tmp_path, [source]) == 5
    report, output = build(tmp_path, [source])
    assert report["written"]["text"] == 3 and report["reasons"] == {"duplicate": 1, "invalid_utf8": 1}
    with pytest.raises(Exception, match="kind: text source only"):
        read_all(SourceConfig(name="p", kind="paired", path=str(path)))
