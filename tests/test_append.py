"""`mmae build --append`: a finished build grows by what is new in its sources; old shards stay
byte-identical, new rows are deduplicated against the dataset, only new URLs are fetched, and a
killed append resumes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mmae import api
from mmae.faults import BUILD_KILL_AFTER_CHUNKS
from mmae.pipelines.demo.serve import WebBehaviour, serve_weblike
from mmae.pipelines.inspect.validate import validate

from PIL import Image

from tests.conftest import write_jsonl
from tests.test_build_scale import cli_build
from tests.test_neardup import encoded, scene

WORDS = "red blue green stone river window garden market yellow quiet letter morning station paper bridge".split()


def caption(number: int) -> str:
    return " ".join(WORDS[(number * 7 + offset) % len(WORDS)] for offset in range(5)) + f" {number}"


def pictures(folder: Path, count: int) -> list[str]:
    """Different pictures of shapes (not flat colours, which have no perceptual hash)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"img/{index:03d}.jpg").write_bytes(encoded(scene(index + 40)))
    return [f"img/{index:03d}.jpg" for index in range(count)]


def files_of(output: Path) -> dict[str, str]:
    return {str(path.relative_to(output)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(output.rglob("*")) if path.is_file() and path.name != "build_report.json"}


def config_file(folder: Path, output: Path, sources: list[dict], **data) -> Path:
    config = {"output": str(output), "sources": sources, "image": {"size": 32, "min_size": 16},
              "download": {"timeout_s": 5, "retries": 0, "threads": 4, "allowed_networks": ["127.0.0.1/32"]},
              "tokenizer": {"vocab_size": 80}, "shards": {"rows_per_shard": 4}, "chunk_rows": 3, **data}
    (folder / "p.yaml").write_text(json.dumps({"data": config}))
    return folder / "p.yaml"


def test_append_fetches_only_new_rows_and_leaves_the_dataset_as_it_was(tmp_path):
    names = pictures(tmp_path / "web", 12)
    with serve_weblike(str(tmp_path / "web"), WebBehaviour(instant=True)) as server:
        url = lambda number: server.base_url + names[number]  # noqa: E731
        write_jsonl(tmp_path / "pairs.jsonl", [{"url": url(number), "caption": caption(number)} for number in range(7)])
        (tmp_path / "texts.txt").write_text("".join(caption(100 + number) + "\n" for number in range(4)))
        sources = [{"name": "pairs", "kind": "paired", "path": str(tmp_path / "pairs.jsonl")},
                   {"name": "texts", "kind": "text", "path": str(tmp_path / "texts.txt")}]
        config = config_file(tmp_path, tmp_path / "out", sources)
        assert cli_build(config).returncode == 0
        out = tmp_path / "out"
        before = files_of(out)
        old_ids = {row["url"]: row["id"] for path in (out / "paired").glob("*.parquet")
                   for row in pq.read_table(path, columns=["url", "id"]).to_pylist()}
        old_texts = {row["caption"]: row["id"] for path in (out / "text").glob("*.parquet")
                     for row in pq.read_table(path, columns=["caption", "id"]).to_pylist()}
        server.hits.clear()

        with open(tmp_path / "pairs.jsonl", "a") as handle:  # rows added at the end of the same file
            for row in ({"url": url(7), "caption": caption(7)},
                        {"url": url(1), "caption": "another caption for an old url"},  # same url: never fetched
                        {"url": url(8), "caption": caption(8)},
                        {"url": url(9), "caption": caption(9)}):
                handle.write(json.dumps(row) + "\n")
        (tmp_path / "more.txt").write_text(caption(101) + "\n" + caption(200) + "\n")  # a new source: one old text
        sources.append({"name": "more", "kind": "text", "path": str(tmp_path / "more.txt")})
        config = config_file(tmp_path, out, sources)
        appended = cli_build(config, "--append", "--", "--direct_num_workers=2",
                             "--direct_running_mode=multi_processing")
        assert appended.returncode == 0, appended.stderr[-3000:]
        # Only the three new URLs were requested, once each.
        assert dict(server.hits) == {f"/{names[number]}": 1 for number in (7, 8, 9)}

    after = files_of(out)
    assert {name: digest for name, digest in after.items() if name in before and name != "manifest.json"} == \
        {name: digest for name, digest in before.items() if name != "manifest.json"}  # old files untouched
    new_files = sorted(set(after) - set(before))
    assert new_files and all("/part-a001-" in name for name in new_files), new_files
    assert not (out / ".append").exists()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"paired": 10, "image": 0, "text": 5}
    paths = [entry["path"] for entry in manifest["shards"]]
    added = [path for path in paths if "/part-a001-" in path]
    assert added and paths[-len(added):] == added  # the new shards come after the old ones
    assert manifest["appends"][0]["generation"] == 1 and manifest["appends"][0]["read"] == 6
    report = json.loads((out / "build_report.json").read_text())
    assert report["balanced"] and report["read"] == 17 and report["sources"]["more"]["written"] == 1

    rejects = {row["key"]: row for path in (out / "rejects").glob("part-a001-*.parquet")
               for row in pq.read_table(path).to_pylist()}
    assert {key: row["reason"] for key, row in rejects.items()} == {"pairs.jsonl:9": "duplicate",
                                                                    "more.txt:1": "duplicate"}
    assert rejects["pairs.jsonl:9"]["detail"] == f"same url as {old_ids[url(1)]}"
    assert rejects["more.txt:1"]["detail"] == f"same text as {old_texts[caption(101)]}"
    new_rows = [row for path in (out / "paired").glob("part-a001-*.parquet") for row in pq.read_table(path).to_pylist()]
    assert sorted(row["caption"] for row in new_rows) == sorted(caption(number) for number in (7, 8, 9))
    assert all(row["tokens"] for row in new_rows)  # tokenized with the dataset's own tokenizer
    checked = validate(str(out))
    assert not checked.problems and checked.rows == 15

    # Nothing new: said, and nothing changes.
    with pytest.raises(Exception, match="nothing to add"):
        api.build(str(config), append=True)
    # A setting that decides what rows are: refused by name.
    with pytest.raises(Exception, match=r"data\.image\.size changed"):
        api.build(str(config), ["data.image.size=48"], append=True)
    assert files_of(out) == after


def test_a_killed_append_resumes_and_near_duplicates_of_old_images_are_found(tmp_path):
    names = pictures(tmp_path / "web", 14)
    with serve_weblike(str(tmp_path / "web"), WebBehaviour(instant=True)) as server:
        rows = [{"url": server.base_url + names[number], "caption": caption(number)} for number in range(6)]
        write_jsonl(tmp_path / "pairs.jsonl", rows)
        sources = [{"name": "pairs", "kind": "paired", "path": str(tmp_path / "pairs.jsonl")}]
        quality = {"near_duplicate_images": 8}
        config = config_file(tmp_path, tmp_path / "out", sources, quality=quality, chunk_rows=1)
        assert cli_build(config).returncode == 0
        out = tmp_path / "out"
        before = files_of(out)
        # A new source whose first picture is an old one mirrored and re-encoded.
        (tmp_path / "web/img/copy.jpg").write_bytes(encoded(scene(40).transpose(Image.Transpose.FLIP_LEFT_RIGHT), 60))
        write_jsonl(tmp_path / "more.jsonl", [{"url": server.base_url + "img/copy.jpg", "caption": caption(0)}]
                    + [{"url": server.base_url + names[number], "caption": caption(number)} for number in range(6, 14)])
        sources.append({"name": "more", "kind": "paired", "path": str(tmp_path / "more.jsonl")})
        config = config_file(tmp_path, out, sources, quality=quality, chunk_rows=1)
        killed = cli_build(config, "--append", env={BUILD_KILL_AFTER_CHUNKS: "3"})
        assert killed.returncode == -9
        assert (out / ".append").exists()
        assert {name: digest for name, digest in files_of(out).items() if not name.startswith(".append/")} == before
        hits_after_kill = dict(server.hits)
        resumed = cli_build(config, "--append")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        # Each new URL was fetched once over both runs (the killed run's committed chunks are kept).
        fetched = {path: count - hits_after_kill.get(path, 0) for path, count in server.hits.items()}
        assert all(count <= 1 for count in fetched.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"]["paired"] == 14
    rejects = [row for path in (out / "rejects").glob("part-a001-*.parquet") for row in pq.read_table(path).to_pylist()]
    assert [(row["key"], row["reason"]) for row in rejects] == [("more.jsonl:1", "near_duplicate")]
    old_first = next(row["id"] for path in (out / "paired").glob("part-0*.parquet")
                     for row in pq.read_table(path, columns=["id", "caption"]).to_pylist() if row["caption"] == caption(0))
    assert rejects[0]["detail"].startswith(f"near-duplicate of {old_first} (image hash ")
    assert not validate(str(out)).problems


def test_a_merge_cut_short_leaves_the_old_dataset_and_the_same_command_finishes_it(tmp_path, monkeypatch):
    from mmae.pipelines.builder import append as appending

    (tmp_path / "texts.txt").write_text("".join(caption(number) + "\n" for number in range(5)))
    sources = [{"name": "texts", "kind": "text", "path": str(tmp_path / "texts.txt")}]
    config = config_file(tmp_path, tmp_path / "out", sources)
    api.build(str(config))
    out = tmp_path / "out"
    old_manifest = (out / "manifest.json").read_text()
    with open(tmp_path / "texts.txt", "a") as handle:
        handle.write(caption(5) + "\n" + caption(6) + "\n")

    real = appending.write_json

    def crash_at_the_manifest(url, payload):
        if url.endswith("/out/manifest.json"):
            raise OSError("killed while replacing the manifest")
        real(url, payload)

    monkeypatch.setattr(appending, "write_json", crash_at_the_manifest)
    with pytest.raises(OSError):
        api.build(str(config), append=True)
    assert (out / "manifest.json").read_text() == old_manifest  # the dataset is still the old one
    assert not validate(str(out)).problems and (out / ".append" / "merge.json").exists()
    monkeypatch.setattr(appending, "write_json", real)
    report = api.build(str(config), append=True)
    assert report["written"]["text"] == 7 and report["balanced"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"]["text"] == 7 and len(manifest["appends"]) == 1 and not (out / ".append").exists()
    texts = [row["caption"] for entry in manifest["shards"] for row in pq.read_table(out / entry["path"]).to_pylist()]
    assert texts == [caption(number) for number in range(7)]  # input order, the new rows after the old


@pytest.mark.parametrize("change, message", [
    ("edit", "changed since it was built"),
    ("extend_last_line", "its last row was extended"),
    ("gzip", "uncompressed"),
    ("damaged_shard", "cannot be read"),
])
def test_an_append_that_cannot_be_told_apart_is_refused_naming_the_file(tmp_path, change, message):
    import gzip

    name = "texts.txt.gz" if change == "gzip" else "texts.txt"
    body = "".join(caption(number) + "\n" for number in range(4))
    if change == "extend_last_line":
        body = body.rstrip("\n")  # no line break after the last row
    write = (lambda text: (tmp_path / name).write_bytes(gzip.compress(text.encode()))) if change == "gzip" else \
        (lambda text: (tmp_path / name).write_text(text))
    write(body)
    sources = [{"name": "texts", "kind": "text", "path": str(tmp_path / name)}]
    config = config_file(tmp_path, tmp_path / "out", sources)
    api.build(str(config))
    out = tmp_path / "out"
    if change == "edit":
        write(body.replace(caption(1), caption(1).upper()) + caption(9) + "\n")
    elif change == "extend_last_line":
        write(body + " more words\n" + caption(9) + "\n")
    elif change == "gzip":  # a second gzip member: how rows are added to a .gz file
        with open(tmp_path / name, "ab") as handle:
            handle.write(gzip.compress((caption(9) + "\n").encode()))
    else:
        write(body + caption(9) + "\n")
        shard = next((out / "text").glob("part-*.parquet"))
        shard.write_bytes(shard.read_bytes()[:-40])
    before = files_of(out)
    with pytest.raises(Exception, match=message) as refused:
        api.build(str(config), append=True)
    assert "part-" in str(refused.value) if change == "damaged_shard" else name in str(refused.value)
    assert {key: value for key, value in files_of(out).items() if not key.startswith(".append/")} == before
