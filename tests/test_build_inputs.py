"""Data users already have builds without downloading again: WebDataset tars, Parquet/JSONL
image columns (img2dataset's and Hugging Face's layouts), image folders with sidecar captions
and class subfolders. No server runs in these tests: nothing may be fetched."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mmae.pipelines.builder.pipeline import BuildError, run
from mmae.schemas.loading import load_config
from PIL import Image

from tests.conftest import jpeg_bytes, write_jsonl


def build(folder: Path, sources: list[dict], **data) -> tuple[dict, Path]:
    output = folder / "out"
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps({"data": {
        "output": str(output), "sources": sources,
        "download": {"timeout_s": 1.0, "retries": 0, "threads": 4},  # no network is allowed at all
        "image": {"size": 32, "min_size": 16}, "tokenizer": {"vocab_size": 60}, **data}}))
    return run(load_config(path)), output


def rows(output: Path, folder: str) -> list[dict]:
    found = []
    for path in sorted((output / folder).glob("*.parquet")):
        found += pq.read_table(path).to_pylist()
    return found


def rejects(output: Path) -> dict[str, str]:
    return {row["key"]: row["reason"] for row in rows(output, "rejects")}


def colour_of(row: dict) -> tuple[int, int, int]:
    return Image.open(io.BytesIO(row["image"])).convert("RGB").getpixel((16, 16))


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


RED, GREEN, BLUE = (200, 20, 20), (20, 200, 20), (20, 20, 200)


def test_webdataset_tars(tmp_path):
    write_tar(tmp_path / "shard-0.tar", [
        ("000001.jpg", jpeg_bytes(colour=RED)), ("000001.txt", b"a red square"),
        ("000001.json", json.dumps({"label": "warm", "width": 96}).encode()),
        ("000002.png", png_bytes(GREEN)), ("000002.txt", b"a green square"), ("000002.cls", b"cool"),
        ("000003.txt", b"a caption without its image"),
        ("000004.jpg", b"not an image at all"), ("000004.txt", b"broken bytes"),
        ("notes", b"a member without an extension belongs to no sample"),
    ])
    write_tar(tmp_path / "shard-1.tar", [
        ("x/000005.webp", jpeg_bytes(colour=BLUE)), ("x/000005.txt", b"a blue square, webp by name only"),
        ("000006.jpg", jpeg_bytes(colour=BLUE)),
    ])
    report, output = build(tmp_path, [{"name": "wds", "kind": "paired", "path": str(tmp_path / "shard-*.tar"),
                                       "label_column": "label"}])
    kept = {row["caption"]: row for row in rows(output, "paired")}
    assert set(kept) == {"a red square", "a green square", "a blue square, webp by name only"}
    assert _close(colour_of(kept["a red square"]), RED) and _close(colour_of(kept["a green square"]), GREEN)
    assert kept["a red square"]["label"] == "warm" and kept["a green square"]["label"] == "cool"
    assert kept["a red square"]["url"].endswith("shard-0.tar#000001")
    assert rejects(output) == {"shard-0.tar#000003": "missing_column", "shard-0.tar#000004": "decode_error",
                               "shard-1.tar#000006": "missing_column"}
    assert report["read"] == 6 and report["balanced"]


def test_a_damaged_tar_fails_naming_it(tmp_path):
    data = write_tar(tmp_path / "good.tar", [("000001.jpg", jpeg_bytes()), ("000001.txt", b"x")]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:700])
    with pytest.raises(BuildError, match="cut.tar"):
        build(tmp_path, [{"name": "wds", "kind": "paired", "path": str(tmp_path / "cut.tar")}])


def test_img2dataset_parquet_with_a_jpg_column(tmp_path):
    table = pa.table({
        "url": ["http://example.invalid/a.jpg", "http://example.invalid/b.jpg", "http://example.invalid/c.jpg"],
        "caption": ["a red square", "a blue square", "download failed"],
        "jpg": [jpeg_bytes(colour=RED), jpeg_bytes(colour=BLUE), None],
        "status": ["success", "success", "failed_to_download"],
    })
    pq.write_table(table, tmp_path / "00000.parquet", row_group_size=2)
    report, output = build(tmp_path, [{"name": "i2d", "kind": "paired", "path": str(tmp_path / "00000.parquet"),
                                       "image_column": "jpg"}])
    kept = {row["caption"]: row for row in rows(output, "paired")}
    assert set(kept) == {"a red square", "a blue square"}
    assert _close(colour_of(kept["a blue square"]), BLUE)  # from the second row group
    assert rejects(output) == {"00000.parquet:3": "missing_column"}


def test_hugging_face_image_struct(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": jpeg_bytes(colour=GREEN), "path": "a.jpg"},
                           {"bytes": None, "path": "only/a/path.jpg"}], type=image_type),
        "label": [3, 5],
    })
    pq.write_table(table, tmp_path / "train.parquet")
    report, output = build(tmp_path, [{"name": "hf", "kind": "image", "path": str(tmp_path / "train.parquet"),
                                       "image_column": "image", "label_column": "label"}])
    kept = rows(output, "image")
    assert len(kept) == 1 and kept[0]["label"] == "3" and _close(colour_of(kept[0]), GREEN)
    assert rejects(output) == {"train.parquet:2": "missing_column"}


def test_base64_image_column_in_jsonl(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [
        {"img": base64.b64encode(jpeg_bytes(colour=RED)).decode(), "caption": "a red square"},
        {"img": "this is not base64!", "caption": "bad"},
    ])
    _, output = build(tmp_path, [{"name": "b64", "kind": "paired", "path": str(tmp_path / "x.jsonl"),
                                  "image_column": "img"}])
    assert [row["caption"] for row in rows(output, "paired")] == ["a red square"]
    assert rejects(output) == {"x.jsonl:2": "decode_error"}


def test_image_column_of_the_wrong_type_fails_naming_it(tmp_path):
    pq.write_table(pa.table({"jpg": ["text, not bytes"], "caption": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(BuildError, match="t.parquet.*image_column"):
        build(tmp_path, [{"name": "p", "kind": "paired", "path": str(tmp_path / "t.parquet"), "image_column": "jpg"}])


def test_image_folder_with_sidecar_captions_and_class_folders(tmp_path):
    root = tmp_path / "photos"
    for label, colour in (("cats", RED), ("dogs", BLUE)):
        (root / label).mkdir(parents=True)
        for index in range(2):
            (root / label / f"{index}.jpg").write_bytes(jpeg_bytes(colour=tuple(c + index for c in colour)))
            (root / label / f"{index}.txt").write_text(f"{label} number {index}\n")
    (root / "dogs" / "uncaptioned.jpg").write_bytes(jpeg_bytes(colour=GREEN))
    (root / "dogs" / "piped.jpg").write_bytes(jpeg_bytes(colour=GREEN))
    os.mkfifo(root / "dogs" / "piped.txt")  # a FIFO for a caption file: refused, not waited on
    report, output = build(tmp_path, [{"name": "folder", "kind": "paired", "path": str(root),
                                       "sidecar_captions": True, "label_from_folder": True}])
    kept = {row["caption"]: row["label"] for row in rows(output, "paired")}
    assert kept == {"cats number 0": "cats", "cats number 1": "cats", "dogs number 0": "dogs", "dogs number 1": "dogs"}
    assert rejects(output) == {"dogs/uncaptioned.jpg": "missing_column", "dogs/piped.jpg": "not_a_file"}
    # Labels without captions: kind image.
    (tmp_path / "again").mkdir()
    _, labelled = build(tmp_path / "again", [{"name": "folder", "kind": "image", "path": str(root),
                                              "label_from_folder": True}])
    # uncaptioned.jpg and piped.jpg hold the same bytes: one of them is a duplicate image.
    assert sorted(row["label"] for row in rows(labelled, "image")) == ["cats", "cats", "dogs", "dogs", "dogs"]


def _close(a, b, tolerance=12) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))
