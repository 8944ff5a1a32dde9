"""The whole Beam pipeline on inputs served from a loopback server, bad ones included."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mmae.pipelines.builder.pipeline import BuildError, run
from mmae.pipelines.shards import write_atomic
from mmae.schemas.loading import load_config
from mmae.schemas.shard import REJECT_SCHEMA, SCHEMA_VERSION, SHARD_SCHEMA

from tests.conftest import write_jsonl

BAD_ROUTES = {
    "/status/404": "http_404",
    "/status/500": "http_500",
    "/slow": "timeout",
    "/trickle": "timeout",
    "/loop": "redirect_loop",
    "/redirect-private": "private_address",
    "/big": "too_large",
    "/html": "not_image",
    "/empty": "decode_error",
    "/truncated": "decode_error",
    "/bomb": "too_many_pixels",
    "/optout": "opt_out",
    "/img/tiny.jpg": "too_small",
    "/img/wide.jpg": "aspect_ratio",
}


def make_corpus(folder: Path, server: str) -> dict[str, str]:
    """Paired, image-only and text-only sources with every bad case; returns key -> expected reason."""
    expected: dict[str, str] = {}
    paired = [
        {"url": f"{server}/img/red.jpg", "caption": "a red square", "label": "square"},
        {"url": f"{server}/img/blue.jpg", "caption": "a blue square", "label": "square"},
        {"url": f"{server}/img/large.jpg", "caption": "a purple field", "label": "field"},
    ]
    for route in BAD_ROUTES:
        paired.append({"url": f"{server}{route}", "caption": f"caption for {route}", "label": "bad"})
    paired += [
        {"url": f"{server}/img/red.jpg", "caption": "the same url again", "label": "dup"},
        {"url": f"{server}/img/green.jpg", "caption": "   ", "label": "empty"},
        {"url": f"{server}/img/green.jpg", "caption": None},
        {"caption": "no url column"},
        {"url": f"{server}/img/green.jpg"},
    ]
    lines = [row for row in paired] + [b'{"url": "x.jpg", "caption": "bad \xc3\x28 utf8"}\n', b"{broken json\n"]
    write_jsonl(folder / "paired.jsonl", lines)
    for index, route in enumerate(BAD_ROUTES, start=4):
        expected[f"paired.jsonl:{index}"] = BAD_ROUTES[route]
    base = 4 + len(BAD_ROUTES)
    expected.update({
        f"paired.jsonl:{base}": "duplicate",
        f"paired.jsonl:{base + 1}": "empty_caption",
        f"paired.jsonl:{base + 2}": "missing_column",
        f"paired.jsonl:{base + 3}": "missing_column",
        f"paired.jsonl:{base + 4}": "missing_column",
        f"paired.jsonl:{base + 5}": "invalid_utf8",
        f"paired.jsonl:{base + 6}": "bad_row",
    })
    # Image-only: the same bytes as a paired image is fine (other kind); the same bytes twice is not.
    write_jsonl(folder / "images.jsonl", [
        {"url": f"{server}/img/green.jpg"},
        {"url": f"{server}/img/green.jpg?copy=1"},  # other URL, same bytes
        {"url": f"{server}/status/404"},
    ])
    expected["images.jsonl:2"] = "duplicate"
    expected["images.jsonl:3"] = "http_404"
    write_jsonl(folder / "texts.jsonl", [
        {"text": "three green circles on a white background"},
        {"text": "three  green circles on a white background "},  # same after cleaning
        {"text": ""},
        b'{"text": "\xff\xfe"}\n',
        {"text": "a long text " + "word " * 200},
    ])
    expected.update({"texts.jsonl:2": "duplicate", "texts.jsonl:3": "empty_caption", "texts.jsonl:4": "invalid_utf8"})
    return expected


def make_config(folder: Path, output: Path, **extra):
    config_file = folder / "pipeline.yaml"
    config_file.write_text(json.dumps({"data": {
        "output": str(output),
        "sources": [
            {"name": "web-pairs", "kind": "paired", "path": str(folder / "paired.jsonl"), "label_column": "label"},
            {"name": "web-images", "kind": "image", "path": str(folder / "images.jsonl")},
            {"name": "web-text", "kind": "text", "path": str(folder / "texts.jsonl")},
        ],
        "download": {"timeout_s": 1.0, "retries": 0, "max_bytes": 200000, "threads": 8,
                     "allowed_networks": ["127.0.0.1/32"]},
        "image": {"size": 32, "min_size": 16},
        "text": {"max_tokens": 16},
        "tokenizer": {"vocab_size": 100},
        "shards": {"rows_per_shard": 2, "rows_per_row_group": 1},
    }}))
    return load_config(config_file, [f"{key}={value}" for key, value in extra.items()])


@pytest.fixture(scope="module")
def built(http_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(folder, http_server)
    output = folder / "out"
    report = run(make_config(folder, output))
    return folder, output, expected, report


def read_rows(output: Path, folder: str) -> list[dict]:
    rows = []
    for path in sorted((output / folder).glob("part-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def test_every_bad_row_has_its_reason(built):
    _, output, expected, _ = built
    rejects = {row["key"]: row for row in read_rows(output, "rejects")}
    got = {key: rejects[key]["reason"] if key in rejects else None for key in expected}
    assert got == expected
    assert all(row["detail"] is not None for row in rejects.values())


def test_nothing_is_lost(built):
    _, output, _, report = built
    assert report["balanced"] is True
    assert report["sources"]["web-pairs"]["read"] == 3 + len(BAD_ROUTES) + 7
    for name, source in report["sources"].items():
        assert source["read"] == source["written"] + source["rejected"], name
    kept = {row["id"] for kind in ("paired", "image", "text") for row in read_rows(output, kind)}
    rejected = {row["id"] for row in read_rows(output, "rejects")}
    assert not kept & rejected
    assert len(kept) + len(rejected) == report["read"]
    assert report["written"] == {"paired": 3, "image": 1, "text": 2}
    assert report["wall_time_s"] > 0 and report["images_per_s"] > 0


def test_shards_follow_schema_v1(built):
    _, output, _, _ = built
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["rows"] == {"paired": 3, "image": 1, "text": 2}
    # The source -> kind map the loader uses (it never reads the build's config back).
    assert manifest["sources"] == {"web-pairs": "paired", "web-images": "image", "web-text": "text"}
    for entry in manifest["shards"] + manifest["rejects"]:
        path = output / entry["path"]
        data = path.read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        parquet = pq.ParquetFile(path)
        assert parquet.metadata.num_rows == entry["rows"]
        expected_schema = REJECT_SCHEMA if entry["kind"] == "rejects" else SHARD_SCHEMA
        assert parquet.schema_arrow.equals(expected_schema, check_metadata=False)
        assert parquet.schema_arrow.metadata[b"mmae.schema_version"] == b"1"
        if entry["kind"] != "rejects":
            columns = parquet.metadata.row_group(0).to_dict()["columns"]
            compression = {column["path_in_schema"]: column["compression"] for column in columns}
            assert compression["image"] == "UNCOMPRESSED" and compression["caption"] == "ZSTD"
            assert parquet.metadata.num_row_groups == entry["rows"]  # rows_per_row_group: 1
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((output / "tokenizer.model").read_bytes()).hexdigest()
    assert manifest["config"]["image"]["size"] == 32
    assert not list(output.rglob(".tmp-*"))


def test_rows_have_images_tokens_and_labels(built):
    from mmae.pipelines.builder.tokenizer import Tokenizer

    _, output, _, _ = built
    tokenizer = Tokenizer((output / "tokenizer.model").read_bytes(), 64)
    paired = read_rows(output, "paired")
    assert sorted(row["caption"] for row in paired) == ["a blue square", "a purple field", "a red square"]
    for row in paired:
        assert row["kind"] == "paired" and row["source"] == "web-pairs"
        assert (row["width"], row["height"]) == (32, 32) and row["image_format"] == "jpeg"
        assert row["image"][:2] == b"\xff\xd8"
        assert row["image_sha256"] == hashlib.sha256(row["image"]).hexdigest()
        assert tokenizer.processor.decode(row["tokens"]) == row["caption"]
    assert {row["label"] for row in paired} == {"square", "field"}
    large = next(row for row in paired if row["caption"] == "a purple field")
    assert (large["original_width"], large["original_height"]) == (640, 480)
    texts = read_rows(output, "text")
    assert all(row["image"] is None and row["url"] is None for row in texts)
    assert max(len(row["tokens"]) for row in texts) == 16  # text.max_tokens


def test_rebuild_is_identical_and_refuses_to_mix(built):
    folder, output, _, _ = built
    with pytest.raises(BuildError, match="--overwrite"):
        run(make_config(folder, output))
    second = folder / "again"
    run(make_config(folder, second))
    first_manifest = json.loads((output / "manifest.json").read_text())
    second_manifest = json.loads((second / "manifest.json").read_text())
    assert len(first_manifest["shards"]) > 3  # rows_per_shard: 2 gives several shards per kind
    assert first_manifest["shards"] == second_manifest["shards"]
    assert first_manifest["rejects"] == second_manifest["rejects"]
    assert first_manifest["tokenizer"] == second_manifest["tokenizer"]


def test_missing_source_fails_before_any_work(tmp_path):
    output = tmp_path / "out"
    config_file = tmp_path / "p.yaml"
    config_file.write_text(json.dumps({"data": {"output": str(output), "sources": [
        {"name": "gone", "kind": "paired", "path": str(tmp_path / "missing.jsonl")}]}}))
    with pytest.raises(BuildError, match="gone.*missing.jsonl.*does not exist"):
        run(load_config(config_file))
    assert not output.exists()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    target = tmp_path / "shard.parquet"

    def broken_move(self, *args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(local.LocalFileSystem, "mv", broken_move)
    with pytest.raises(OSError):
        write_atomic(str(target), b"data")
    assert not target.exists()


def _text_only_config(tmp_path: Path, output: str, **data):
    write_jsonl(tmp_path / "t.jsonl", [{"text": f"sentence number {i} about shapes"} for i in range(50)])
    config_file = tmp_path / "p.yaml"
    config_file.write_text(json.dumps({"data": {
        "output": output, "sources": [{"name": "t", "kind": "text", "path": str(tmp_path / "t.jsonl")}], **data}}))
    return load_config(config_file)


def test_progress_is_logged(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="mmae.build")
    run(_text_only_config(tmp_path, str(tmp_path / "out"), progress_every_s=0.01))
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("progress:")]
    assert lines and lines[-1].startswith("progress: 50 of 50 input rows (100.0%) in 1 of 1 chunks;")
    assert "rows/s; ETA" in lines[-1]


def test_output_through_fsspec(tmp_path):
    import fsspec

    report = run(_text_only_config(tmp_path, "memory://mmae-test/out"))
    fs = fsspec.filesystem("memory")
    manifest = json.loads(fs.cat("/mmae-test/out/manifest.json"))
    assert manifest["rows"]["text"] == 50 == report["written"]["text"]
    assert fs.exists("/mmae-test/out/" + manifest["shards"][0]["path"])


def test_every_reason_the_build_gives_is_documented(built):
    from mmae.schemas.shard import REJECT_REASONS

    _, _, _, report = built
    undocumented = [reason for reason in report["reasons"] if reason not in REJECT_REASONS
                    and not reason.startswith("http_")]
    assert not undocumented
