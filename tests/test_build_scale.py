"""The build at corpus scale: resume after kill -9, a hanging URL holds one slot only, retrying
transient rejects, the empty-build error, and the staging area's invariants."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mmae.faults import BUILD_KILL_AFTER_CHUNKS as KILL_AFTER_CHUNKS_ENV
from mmae.pipelines.builder.pipeline import run
from mmae.pipelines.demo.serve import WebBehaviour, serve_weblike
from mmae.schemas.loading import load_config

from tests.conftest import jpeg_bytes, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
CHUNK_FILES = "[0-9][0-9][0-9][0-9][0-9]-[0-9][0-9][0-9][0-9][0-9][0-9].parquet"  # committed chunks, not parts


def make_images(folder: Path, count: int) -> list[str]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"img/{index:04d}.jpg"
        (folder / name).write_bytes(jpeg_bytes(48, 48, colour=(index * 5 % 256, 90, 255 - index * 3 % 256)))
        names.append(name)
    return names


def write_config(folder: Path, output: Path, urls: list[str], **data) -> Path:
    write_jsonl(folder / "pairs.jsonl", [{"url": url, "caption": f"picture number {i}"} for i, url in enumerate(urls)])
    config = {
        "output": str(output),
        "sources": [{"name": "pairs", "kind": "paired", "path": str(folder / "pairs.jsonl")}],
        "download": {"timeout_s": 5, "retries": 0, "threads": 2, "allowed_networks": ["127.0.0.1/32"]},
        "image": {"size": 32, "min_size": 16},
        "tokenizer": {"vocab_size": 60},
        "shards": {"rows_per_shard": 7, "rows_per_row_group": 3},
        "chunk_rows": 5,
        **data,
    }
    (folder / "p.yaml").write_text(json.dumps({"data": config}))
    return folder / "p.yaml"


def cli_build(config: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmae.cli", "build", "--config", str(config), *extra],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})


def shard_entries(output: Path) -> dict:
    manifest = json.loads((output / "manifest.json").read_text())
    strip = lambda entries: [{key: entry[key] for key in ("path", "rows", "sha256")} for entry in entries]  # noqa: E731
    return {"shards": strip(manifest["shards"]), "rejects": strip(manifest["rejects"]), "rows": manifest["rows"]}


def test_kill_9_mid_build_then_resume_fetches_each_url_once(tmp_path):
    names = make_images(tmp_path / "web", 40)
    behaviour = WebBehaviour(instant=True)
    with serve_weblike(str(tmp_path / "web"), behaviour) as server:
        urls = [server.base_url + name for name in names] + [server.base_url + "img/missing.jpg"]
        reference = write_config(tmp_path, tmp_path / "reference", urls)
        assert cli_build(reference).returncode == 0
        reference_hits = sum(server.hits.values())
        server.hits.clear()

        config = write_config(tmp_path, tmp_path / "out", urls)
        killed = cli_build(config, env={KILL_AFTER_CHUNKS_ENV: "3"})
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert not (tmp_path / "out" / "manifest.json").exists()
        committed = sorted(p.name for p in (tmp_path / "out" / "staging" / "chunks" / "pairs").glob(CHUNK_FILES))
        assert len(committed) == 3
        hits_before_resume = Counter(server.hits)

        resumed = cli_build(config)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "were committed by an earlier run" in resumed.stderr
    # The rows of committed chunks were not fetched again; nothing was fetched more than twice
    # (rows in flight at the kill), and in all at most the in-flight window more than once.
    chunk_numbers = [int(name.split("-")[1].split(".")[0]) for name in committed]
    rows_of_committed = [urls[row] for number in chunk_numbers for row in range(number * 5, number * 5 + 5)]
    for url in rows_of_committed:
        assert server.hits["/" + url.split("/", 3)[3]] == 1
    total = sum(server.hits.values())
    assert reference_hits == len(urls)
    # Refetched at all: only rows in flight or finished in still-open chunks at the kill (the
    # committed chunks' rows were checked above: fetched once).
    assert len(urls) <= total <= len(urls) + 20
    assert hits_before_resume  # the kill happened mid-build, after real work
    assert shard_entries(tmp_path / "out") == shard_entries(tmp_path / "reference")


def test_same_command_on_finished_build_needs_overwrite_and_changed_settings_refused(tmp_path):
    names = make_images(tmp_path / "web", 6)
    with serve_weblike(str(tmp_path / "web"), WebBehaviour(instant=True)) as server:
        config = write_config(tmp_path, tmp_path / "out", [server.base_url + name for name in names])
        assert cli_build(config, env={KILL_AFTER_CHUNKS_ENV: "1"}).returncode == -9
        changed = cli_build(config, "--set", "data.image.size=24")
        assert changed.returncode == 2
        assert "unfinished build with other settings (image.size)" in changed.stderr
        # Speed settings may change on resume.
        assert cli_build(config, "--set", "data.download.threads=3").returncode == 0
        again = cli_build(config)
        assert again.returncode == 2 and "--overwrite" in again.stderr


class _HangHandler(http.server.BaseHTTPRequestHandler):
    """/hang waits until the test releases it; everything else is a small JPEG."""

    protocol_version = "HTTP/1.1"
    release = threading.Event()
    hits: Counter = Counter()

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        _HangHandler.hits[self.path] += 1
        if self.path == "/hang":
            self.release.wait(120)
        body = jpeg_bytes(40, 40)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_hanging_url_holds_one_slot_not_the_others(tmp_path):
    _HangHandler.release.clear()
    _HangHandler.hits.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/hang"] + [f"{base}/img/{i}.jpg" for i in range(24)]
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path, output, urls, download={
        "timeout_s": 100, "retries": 0, "threads": 3, "allowed_networks": ["127.0.0.1/32"]}))
    result: dict = {}
    builder = threading.Thread(target=lambda: result.setdefault("report", run(config)), daemon=True)
    builder.start()
    try:
        chunks = output / "staging" / "chunks" / "pairs"
        # The first chunk holds /hang. While it hangs, the four chunks after it are downloaded
        # and committed by the two other slots (with a batch-at-a-time downloader, none is).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(chunks.glob(CHUNK_FILES))) < 4:
            time.sleep(0.05)
        committed = sorted(path.name for path in chunks.glob(CHUNK_FILES))
        assert not _HangHandler.release.is_set()
        assert committed == ["00000-000001.parquet", "00000-000002.parquet", "00000-000003.parquet",
                             "00000-000004.parquet"]
        assert _HangHandler.hits["/hang"] == 1
    finally:
        _HangHandler.release.set()
        builder.join(60)
        server.shutdown()
    assert result["report"]["written"]["paired"] == 25


def test_rows_finished_in_a_chunk_held_open_by_a_hang_survive_a_kill(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _HangHandler.release.clear()
    _HangHandler.hits.clear()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/hang"] + [f"{base}/img/{i}.jpg" for i in range(4)]  # one chunk of 5
    config = write_config(tmp_path, tmp_path / "out", urls, download={
        "timeout_s": 100, "retries": 0, "threads": 2, "allowed_networks": ["127.0.0.1/32"]})
    process = subprocess.Popen([sys.executable, "-m", "mmae.cli", "build", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        part = tmp_path / "out" / "staging" / "chunks" / "pairs" / "00000-000000.part-0000.parquet"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not part.exists():
            time.sleep(0.05)
        assert part.exists()  # the chunk waits on /hang; its four finished rows were saved
        process.kill()
        process.wait()
    finally:
        _HangHandler.release.set()
    resumed = cli_build(config)
    server.shutdown()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert all(_HangHandler.hits[f"/img/{i}.jpg"] == 1 for i in range(4))  # not fetched again
    assert _HangHandler.hits["/hang"] == 2
    assert not list((tmp_path / "out" / "staging").rglob("*.part-*"))  # merged into the chunk file
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["written"]["paired"] == 5


def test_retry_transient_fetches_only_transient_failures_again(tmp_path):
    names = make_images(tmp_path / "web", 12)
    # Every other request for a "flaky" path fails with 503 the first time.
    with serve_weblike(str(tmp_path / "web"), WebBehaviour(instant=True)) as server:
        flaky = {"/" + names[3], "/" + names[8]}
        server.fail_first = flaky
        urls = [server.base_url + name for name in names] + [server.base_url + "img/none.jpg"]
        config = write_config(tmp_path, tmp_path / "out", urls)
        first = cli_build(config)
        assert first.returncode == 0, first.stderr[-2000:]
        report = json.loads((tmp_path / "out" / "build_report.json").read_text())
        assert report["reasons"] == {"http_503": 2, "http_404": 1}
        assert report["written"]["paired"] == 10

        retried = cli_build(config, "--retry-transient")
        assert retried.returncode == 0, retried.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["reasons"] == {"http_404": 1} and report["written"]["paired"] == 12
    assert report["read"] == 13 and report["balanced"]
    assert server.hits["/img/none.jpg"] == 1  # a 404 is not transient: not fetched again
    assert all(server.hits[path] == 2 for path in flaky)
    assert all(server.hits["/" + name] == 1 for name in names if "/" + name not in flaky)
    rows = [row for path in sorted((tmp_path / "out" / "paired").glob("part-*.parquet"))
            for row in pq.read_table(path, columns=["url"]).to_pylist()]
    assert [row["url"] for row in rows] == urls[:-1]  # input order, the retried rows in their place


def test_a_build_that_writes_nothing_fails_with_reasons_and_a_hint(tmp_path):
    names = make_images(tmp_path / "web", 4)
    with serve_weblike(str(tmp_path / "web"), WebBehaviour(instant=True)) as server:
        config = write_config(tmp_path, tmp_path / "out", [server.base_url + name for name in names],
                              download={"retries": 0})  # 127.0.0.1 not allowed
        completed = cli_build(config)
    assert completed.returncode == 2
    assert "the build wrote no rows: 4 read, 4 rejected (private_address 4)" in completed.stderr
    assert "allowed_networks" in completed.stderr
    assert not server.hits  # refused before any connection
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_staging_is_removed_when_not_kept_and_retry_then_refused(tmp_path):
    names = make_images(tmp_path / "web", 3)
    with serve_weblike(str(tmp_path / "web"), WebBehaviour(instant=True)) as server:
        config = write_config(tmp_path, tmp_path / "out", [server.base_url + name for name in names],
                              keep_staging=False)
        assert cli_build(config).returncode == 0
        assert not (tmp_path / "out" / "staging").exists()
        retry = cli_build(config, "--retry-transient")
    assert retry.returncode == 2 and "staging area is gone" in retry.stderr


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "corrupt"])
def test_a_damaged_gz_source_fails_before_any_work_naming_the_file(tmp_path, damage):
    import gzip

    data = gzip.compress(b"".join(json.dumps({"text": f"text {i}"}).encode() + b"\n" for i in range(2000)))
    bad = {"truncated": data[: len(data) // 2], "not gzip": b"not gzip at all",
           "corrupt": data[:20] + b"\x00" * 50 + data[70:]}[damage]
    (tmp_path / "t.jsonl.gz").write_bytes(bad)
    (tmp_path / "p.yaml").write_text(json.dumps({"data": {"output": str(tmp_path / "out"), "sources": [
        {"name": "t", "kind": "text", "path": str(tmp_path / "t.jsonl.gz")}]}}))
    completed = cli_build(tmp_path / "p.yaml")
    assert completed.returncode == 2
    assert f"source 't': cannot read {tmp_path / 't.jsonl.gz'}" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "out").exists()
