"""Input from strangers: no row can crash, stall or reach outside what the source allows, and
--overwrite never deletes what an mmae build did not write."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mmae.pipelines.builder.pipeline import BuildError, run
from mmae.schemas.loading import load_config

from tests.conftest import jpeg_bytes, write_jsonl


def config_for(folder: Path, output: Path, sources: list[dict], **data):
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps({"data": {
        "output": str(output),
        "sources": sources,
        "download": {"timeout_s": 2.0, "retries": 0, "threads": 4, "allowed_networks": ["127.0.0.1/32"]},
        "image": {"size": 32, "min_size": 16},
        "tokenizer": {"vocab_size": 60},
        "shards": {"rows_per_shard": 50},
        **data,
    }}))
    return load_config(path)


def rejects(output: Path) -> dict[str, tuple[str, str]]:
    rows = []
    for path in sorted((output / "rejects").glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return {row["key"]: (row["reason"], row["detail"] or "") for row in rows}


def stored_urls(output: Path) -> list[str]:
    urls = []
    for folder in ("paired", "image"):
        for path in sorted((output / folder).glob("*.parquet")):
            urls += pq.read_table(path, columns=["url"]).column("url").to_pylist()
    return urls


# --- the URL policy ----------------------------------------------------------------------------


@pytest.fixture
def private_corpus(tmp_path, http_server):
    """A source folder with its own image, a private image beside it, and a URL list that
    names the private one every way a stranger could."""
    private = tmp_path / "home" / "secret.jpg"
    private.parent.mkdir()
    private.write_bytes(jpeg_bytes(64, 64, colour=(10, 200, 10)))
    source = tmp_path / "corpus"
    (source / "img").mkdir(parents=True)
    (source / "img" / "own.jpg").write_bytes(jpeg_bytes(64, 64))
    (source / "img" / "escape.jpg").symlink_to(private)
    os.mkfifo(source / "img" / "fifo.jpg")
    rows = [
        {"url": "img/own.jpg", "caption": "inside the source folder"},
        {"url": f"{http_server}/img/red.jpg", "caption": "on the web"},
        {"url": str(private), "caption": "an absolute path"},
        {"url": f"file://{private}", "caption": "a file url"},
        {"url": f"FILE://{private}", "caption": "a file url in capitals"},
        {"url": f"local://{private}", "caption": "a local url"},
        {"url": "../home/secret.jpg", "caption": "a relative path out of the folder"},
        {"url": "img/escape.jpg", "caption": "a symlink out of the folder"},
        {"url": "/etc/shadow", "caption": "a system file"},
        {"url": "img/fifo.jpg", "caption": "a named pipe"},
        {"url": "Memory://bucket/x.jpg", "caption": "an in-memory file system"},
        {"url": "s3://bucket/x.jpg", "caption": "an object store"},
        {"url": "img/nul\u0000.jpg", "caption": "a NUL byte"},
        {"url": "ftp://example.com/x.jpg", "caption": "another protocol"},
    ]
    write_jsonl(source / "list.jsonl", rows)
    return tmp_path, source, private


def test_a_url_list_reaches_only_the_web_and_its_own_folder(private_corpus):
    tmp_path, source, private = private_corpus
    config = config_for(tmp_path, tmp_path / "out", [
        {"name": "p", "kind": "paired", "path": str(source / "list.jsonl")}])
    report = run(config)
    assert report["written"]["paired"] == 2
    urls = stored_urls(tmp_path / "out")
    assert not any("secret" in url or "escape" in url for url in urls)
    found = rejects(tmp_path / "out")
    refused = {f"list.jsonl:{row}" for row in (3, 4, 5, 6, 7, 8, 9, 11, 12)}
    for key in refused:
        reason, detail = found[key]
        assert reason == "url_not_allowed", (key, reason, detail)
        assert "bytes" not in detail  # nothing about the file (its existence or size) leaks
    assert found["list.jsonl:10"][0] == "not_a_file"  # the FIFO: refused, not waited on
    assert found["list.jsonl:13"][0] == "bad_url"
    assert found["list.jsonl:14"][0] == "bad_url"


def test_local_files_only_where_the_source_opts_in(private_corpus):
    tmp_path, source, private = private_corpus
    config = config_for(tmp_path, tmp_path / "out", [
        {"name": "p", "kind": "paired", "path": str(source / "list.jsonl"), "allow_local_files": True}])
    run(config)
    found = rejects(tmp_path / "out")
    # Absolute paths, file:// and ../ now read the private image (the same path again is a
    # duplicate URL); the link out of the folder is followed.
    assert "list.jsonl:3" not in found and "list.jsonl:8" not in found
    assert {found[f"list.jsonl:{row}"][0] for row in (4, 5, 6, 7)} == {"duplicate"}
    assert found["list.jsonl:9"][0] in ("not_found", "decode_error", "permission_denied")
    assert found["list.jsonl:10"][0] == "not_a_file"
    assert found["list.jsonl:12"][0] == "url_not_allowed"  # object stores are a separate choice


def test_object_store_without_its_package_is_a_reject(tmp_path):
    if importlib.util.find_spec("s3fs"):
        pytest.skip("s3fs is installed here")
    write_jsonl(tmp_path / "list.jsonl", [{"url": "s3://bucket/x.jpg", "caption": "one"},
                                         {"url": "x.jpg", "caption": "two"}])
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes())
    config = config_for(tmp_path, tmp_path / "out", [
        {"name": "p", "kind": "paired", "path": str(tmp_path / "list.jsonl"), "allow_object_stores": True}])
    run(config)
    reason, detail = rejects(tmp_path / "out")["list.jsonl:1"]
    assert reason == "bad_url" and "s3fs" in detail


# --- rows that used to crash the build ---------------------------------------------------------


def test_every_row_level_problem_is_a_reject(tmp_path, http_server):
    good = f"{http_server}/img/red.jpg"
    write_jsonl(tmp_path / "p.jsonl", [
        {"url": good, "caption": "a good row"},
        {"url": 12345, "caption": "a number for a url"},
        {"url": [good], "caption": "a list for a url"},
        {"url": {"href": good}, "caption": "an object for a url"},
        {"url": True, "caption": "a boolean for a url"},
        {"url": f"{http_server}/img/blue.jpg", "caption": {"a": 1}},
        {"url": f"{http_server}/img/green.jpg", "caption": ["a", "b"]},
        {"url": f"{http_server}/img/large.jpg", "caption": False},
        {"url": f"{http_server}/img/red.jpg?\ud800", "caption": "a lone surrogate in the url"},
        {"url": f"{http_server}/img/red.jpg?2", "caption": "a lone surrogate \udfff in the caption"},
    ])
    write_jsonl(tmp_path / "t.jsonl", [{"text": "fine text"}, {"text": {"nested": "text"}}, {"text": 3.5}])
    config = config_for(tmp_path, tmp_path / "out", [
        {"name": "p", "kind": "paired", "path": str(tmp_path / "p.jsonl")},
        {"name": "t", "kind": "text", "path": str(tmp_path / "t.jsonl")}])
    report = run(config)
    assert report["balanced"]
    found = rejects(tmp_path / "out")
    assert {found[f"p.jsonl:{row}"][0] for row in (2, 3, 4, 5)} == {"bad_url"}
    assert "int" in found["p.jsonl:2"][1] and "list" in found["p.jsonl:3"][1]
    assert {found[f"p.jsonl:{row}"][0] for row in (6, 7, 8)} == {"bad_caption"}
    assert found["p.jsonl:9"][0] == "invalid_utf8" and found["p.jsonl:10"][0] == "invalid_utf8"
    assert found["t.jsonl:2"][0] == "bad_caption" and found["t.jsonl:3"][0] == "bad_caption"
    assert report["written"] == {"paired": 1, "image": 0, "text": 1}


def _source_error(tmp_path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    config = config_for(tmp_path, tmp_path / "out", [{"name": "p", "kind": "paired", "path": str(tmp_path / name)}])
    with pytest.raises(BuildError) as error:
        run(config)
    return str(error.value)


@pytest.mark.parametrize("name, data", [
    ("fake.jsonl.gz", b"this is not gzip at all\n" * 10),
    ("cut.jsonl.gz", gzip.compress(b"".join(b'{"url": "%d.jpg", "caption": "x"}\n' % i for i in range(2000)))[:2000]),
    ("empty.parquet", b""),
    ("fake.parquet", b"PAR1 but not really"),
])
def test_an_unreadable_source_file_fails_naming_it(tmp_path, name, data):
    message = _source_error(tmp_path, name, data)
    assert name in message and "Traceback" not in message


@pytest.mark.parametrize("header", ["url, caption", "\ufeffurl,caption", ' "url" , "caption" '])
def test_csv_headers_people_write_are_read(tmp_path, header):
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "y.jpg").write_bytes(jpeg_bytes(colour=(1, 2, 250)))
    (tmp_path / "list.csv").write_text(f"{header}\nx.jpg,first image\ny.jpg,second image\n", encoding="utf-8")
    config = config_for(tmp_path, tmp_path / "out", [{"name": "p", "kind": "paired", "path": str(tmp_path / "list.csv")}])
    report = run(config)
    assert report["written"]["paired"] == 2


# --- --overwrite -------------------------------------------------------------------------------


def _small_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jpg").write_bytes(jpeg_bytes())
    write_jsonl(folder / "list.jsonl", [{"url": "a.jpg", "caption": "a red square"}])
    return folder / "list.jsonl"


def test_overwrite_refuses_a_folder_that_is_not_an_mmae_build(tmp_path):
    listing = _small_corpus(tmp_path / "corpus")
    output = tmp_path / "mine"
    for name in ("image", "text", "paired"):
        (output / name).mkdir(parents=True)
        (output / name / "notes.txt").write_text("my own work")
    (output / "manifest.json").write_text('{"my": "own manifest"}')
    config = config_for(tmp_path, output, [{"name": "p", "kind": "paired", "path": str(listing)}])
    with pytest.raises(BuildError, match="not an mmae build"):
        run(config, overwrite=True)
    assert (output / "paired" / "notes.txt").read_text() == "my own work"
    assert json.loads((output / "manifest.json").read_text()) == {"my": "own manifest"}


@pytest.mark.parametrize("where", ["parent", "inside"])
def test_an_output_that_holds_or_sits_in_an_input_is_refused(tmp_path, where):
    listing = _small_corpus(tmp_path / "corpus")
    images = tmp_path / "corpus"
    sources = [{"name": "p", "kind": "paired", "path": str(listing)},
               {"name": "i", "kind": "image", "path": str(images)}]
    output = tmp_path if where == "parent" else images / "out"
    config = config_for(tmp_path / "corpus", output, sources)
    with pytest.raises(BuildError, match="input"):
        run(config, overwrite=True)
    assert listing.exists() and (images / "a.jpg").exists()


def test_overwrite_keeps_the_old_build_until_the_new_one_succeeds(tmp_path):
    listing = _small_corpus(tmp_path / "corpus")
    output = tmp_path / "out"
    run(config_for(tmp_path, output, [{"name": "p", "kind": "paired", "path": str(listing)}]))
    before = {path.relative_to(output): path.read_bytes() for path in output.rglob("*")
              if path.is_file() and "staging" not in path.parts}
    # The new build writes nothing (every row refused): it fails, and the old build is still whole.
    write_jsonl(tmp_path / "bad.jsonl", [{"url": "/etc/hostname", "caption": "refused"}])
    with pytest.raises(BuildError, match="wrote no rows"):
        run(config_for(tmp_path, output, [{"name": "p", "kind": "paired", "path": str(tmp_path / "bad.jsonl")}]),
            overwrite=True)
    after = {path.relative_to(output): path.read_bytes() for path in output.rglob("*")
             if path.is_file() and "staging" not in path.parts}
    assert after == before
    # A later successful overwrite replaces it.
    write_jsonl(tmp_path / "two.jsonl", [{"url": "corpus/a.jpg", "caption": "the same image again"}])
    report = run(config_for(tmp_path, output, [{"name": "q", "kind": "paired", "path": str(tmp_path / "two.jsonl")}]),
                 overwrite=True)
    assert report["written"]["paired"] == 1
    manifest = json.loads((output / "manifest.json").read_text())
    assert [source["name"] for source in manifest["config"]["sources"]] == ["q"]


# --- never stalls ------------------------------------------------------------------------------


def test_a_fifo_never_stalls_the_build(tmp_path):
    """In a subprocess with a deadline: a build that opens a FIFO blocks for good."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes())
    write_jsonl(tmp_path / "list.jsonl", [{"url": "pipe.jpg", "caption": "a pipe"}, {"url": "x.jpg", "caption": "fine"}])
    config_for(tmp_path, tmp_path / "out", [{"name": "p", "kind": "paired", "path": str(tmp_path / "list.jsonl")}])
    completed = subprocess.run([str(Path(sys.executable).parent / "mmae"), "build", "--config", str(tmp_path / "pipeline.yaml")],
                               capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert rejects(tmp_path / "out")["list.jsonl:1"][0] == "not_a_file"
