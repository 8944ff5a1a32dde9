"""`mmae stats` and `mmae validate` on a small real build, and on broken copies of it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mmae.pipelines.builder.pipeline import run
from mmae.pipelines.demo.corpus import generate
from mmae.pipelines.inspect.dataset import Dataset
from mmae.pipelines.inspect.stats import compute_stats
from mmae.pipelines.shards import table_bytes
from mmae.schemas.loading import load_config
from mmae.schemas.shard import SHARD_SCHEMA

ROOT = Path(__file__).resolve().parent.parent


def mmae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmae.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stats")
    generate(folder / "raw", pairs=60, images=20, texts=60, side=48)
    with open(folder / "raw" / "text_only.jsonl", "a") as handle:  # a few rejects
        handle.write(json.dumps({"text": ""}) + "\n" + json.dumps({"other": 1}) + "\n")
    config = folder / "p.yaml"
    config.write_text(json.dumps({"data": {
        "output": str(folder / "ds"),
        "sources": [
            {"name": "pairs", "kind": "paired", "path": str(folder / "raw/paired.jsonl"), "label_column": "label"},
            {"name": "images", "kind": "image", "path": str(folder / "raw/images_only.jsonl")},
            {"name": "texts", "kind": "text", "path": str(folder / "raw/text_only.jsonl")},
        ],
        "image": {"size": 32},
        "text": {"max_tokens": 12},
        "shards": {"rows_per_shard": 25, "rows_per_row_group": 10},
    }}))
    run(load_config(config))
    return folder / "ds"


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_stats_json_agrees_with_manifest(dataset):
    result = mmae("stats", str(dataset), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    manifest = manifest_of(dataset)
    assert stats["rows"] == manifest["rows"] == {"paired": 60, "image": 20, "text": stats["rows"]["text"]}
    assert stats["bytes"] == sum(entry["bytes"] for entry in manifest["shards"])
    assert sum(stats["rejected"].values()) == manifest["rejected"]
    assert stats["rejected"]["empty_caption"] == 1 and stats["rejected"]["missing_column"] == 1
    assert set(stats["tokens"]) >= {"mean", "p50", "p95", "max"}
    assert stats["tokens"]["max"] == 12 and 0 < stats["tokens"]["truncated_share"] <= 1
    assert set(stats["image"]["width"]) >= {"mean", "p50", "p95", "max"} and stats["image"]["width"]["max"] == 32
    assert stats["image"]["original_width"]["p50"] == 48
    assert stats["tokens_by_source"]["pairs"]["count"] == 60
    assert stats["image_by_source"]["images"]["width"]["count"] == 20
    assert sum(row["n"] for row in stats["labels"]) == 60
    assert 0 < stats["image"]["bytes_per_image_mean"] < 5000
    assert stats["tokenizer"]["unknown_share"] == 0.0
    assert stats["tokenizer"]["top"][0]["count"] >= stats["tokenizer"]["top"][-1]["count"]


def test_bytes_per_image_from_footers_is_exact(dataset):
    manifest = manifest_of(dataset)
    sizes = [len(value) for entry in manifest["shards"] if entry["kind"] in ("paired", "image")
             for value in pq.read_table(dataset / entry["path"], columns=["image"]).column("image").to_pylist()]
    stats = compute_stats(Dataset.open(str(dataset)))
    assert stats["image"]["bytes_per_image_mean"] == pytest.approx(sum(sizes) / len(sizes), rel=0.01)


def test_stats_never_reads_the_image_column(dataset, monkeypatch):
    import mmae.pipelines.inspect.stats as stats_module

    requested: list[list[str]] = []
    real_scan = stats_module.scan

    def recording_scan(urls, columns):
        requested.append(list(columns))
        return real_scan(urls, columns)

    monkeypatch.setattr(stats_module, "scan", recording_scan)
    compute_stats(Dataset.open(str(dataset)))
    assert requested and not any("image" in columns for columns in requested)


def test_stats_tables(dataset):
    result = mmae("stats", str(dataset))
    assert result.returncode == 0, result.stderr
    for title in ("rows by kind", "rejected by source and reason", "token lengths", "image sizes", "labels",
                  "top tokens"):
        assert title in result.stdout
    assert re.search(r"paired\s+┆\s+60", result.stdout)


def test_stats_over_fsspec(dataset):
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in dataset.rglob("*"):
        if path.is_file():
            memory.pipe(f"/stats-copy/{path.relative_to(dataset)}", path.read_bytes())
    stats = compute_stats(Dataset.open("memory://stats-copy"))
    assert stats["rows"] == manifest_of(dataset)["rows"]


def test_stats_on_a_folder_without_manifest(tmp_path):
    result = mmae("stats", str(tmp_path))
    assert result.returncode == 2 and "no manifest.json" in result.stderr


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def test_html_report_renders_its_images_in_a_browser(dataset, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("MMAE_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (MMAE_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    report = tmp_path / "report.html"
    result = mmae("stats", str(dataset), "--html", str(report), "--samples", "12")
    assert result.returncode == 0, result.stderr
    page = report.read_text()
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    image_cards = page.count("<img src='data:image/jpeg")
    charts = page.count("<img src='data:image/png")
    assert image_cards == 8 and charts == 3  # 12 samples over 3 kinds: 4 paired + 4 image + 4 text cards

    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile1'}",
                          "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    assert total == loaded == image_cards + charts

    screenshot = tmp_path / "shot.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1200,900",
                    f"--screenshot={screenshot}", report.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    colours = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # charts and text, not a blank page


def test_gallery_decodes_tokens_and_flags_mismatches(dataset):
    from mmae.pipelines.inspect.report_html import render_html, sample_rows

    data = Dataset.open(str(dataset))
    samples = sample_rows(data, 6)
    assert len(samples) == 6 and {row["kind"] for row in samples} == {"paired", "image", "text"}
    paired = next(row for row in samples if row["kind"] == "paired")
    page = render_html(compute_stats(data), samples, data.tokenizer_model())
    assert "class='card mismatch'" not in page
    assert "[cut at max_tokens]" in page  # max_tokens: 12 cuts most demo captions
    tampered = {**paired, "tokens": list(reversed(paired["tokens"]))}
    page = render_html(compute_stats(data), [tampered], data.tokenizer_model())
    assert "class='card mismatch'" in page and "stored caption differs" in page


# ---------------------------------------------------------------------------- validate


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(dataset, target)
    return target


def rewrite_shard(root: Path, relative: str, rows: list[dict], schema: pa.Schema = SHARD_SCHEMA) -> None:
    """Replace a shard and update its manifest entry, so only content checks can notice."""
    data = table_bytes(rows, schema, 10)
    (root / relative).write_bytes(data)
    manifest = manifest_of(root)
    for entry in manifest["shards"]:
        if entry["path"] == relative:
            entry.update(rows=len(rows), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(manifest))


def first_shard(root: Path, kind: str = "paired") -> str:
    return next(entry["path"] for entry in manifest_of(root)["shards"] if entry["kind"] == kind)


def problems(root: Path) -> str:
    result = mmae("validate", str(root))
    assert result.returncode == 1, result.stdout
    return result.stdout


def test_validate_passes_a_good_build(dataset):
    result = mmae("validate", str(dataset))
    assert result.returncode == 0, result.stdout
    assert "OK" in result.stdout and "80 images decoded" in result.stdout


def test_truncated_shard(copy):
    shard = first_shard(copy)
    data = (copy / shard).read_bytes()
    (copy / shard).write_bytes(data[: len(data) // 2])
    out = problems(copy)
    assert f"{shard}: " in out and "sha256 differs" in out and "not a readable Parquet file" in out


def test_foreign_parquet_file(copy):
    shard = first_shard(copy)
    rewrite_shard(copy, shard, [{"a": 1, "b": "x"}], pa.schema([("a", pa.int64()), ("b", pa.string())]))
    out = problems(copy)
    assert f"{shard}: missing column 'id'" in out and "mmae.schema_version" in out


def test_missing_shard(copy):
    shard = first_shard(copy, "text")
    (copy / shard).unlink()
    assert f"{shard}: listed in the manifest but missing on disk" in problems(copy)


def test_manifest_that_lies(copy):
    manifest = manifest_of(copy)
    manifest["shards"][0]["rows"] += 5
    manifest["rows"]["paired"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = problems(copy)
    assert f"{manifest['shards'][0]['path']}: " in out and "manifest says" in out
    assert "rows.paired" in out


def test_bad_token_and_image_rows_are_named(copy):
    shard = first_shard(copy)
    rows = pq.read_table(copy / shard).to_pylist()
    rows[3]["tokens"] = rows[3]["tokens"] + [999_999]
    rows[5]["width"] = 99
    rows[7]["image"] = rows[7]["image"][:50]
    rewrite_shard(copy, shard, rows)
    out = problems(copy)
    assert f"{shard} row 3: token id 999999 outside" in out
    assert f"{shard} row 5: image decodes at 32x32, recorded 99x32" in out
    assert f"{shard} row 7: image does not decode" in out


def test_unlisted_file_and_tokenizer_hash(copy):
    shutil.copy(copy / first_shard(copy), copy / "paired" / "part-09999-of-09999.parquet")
    (copy / "tokenizer.model").write_bytes(b"not a model")
    out = problems(copy)
    assert "paired/part-09999-of-09999.parquet: shard file not listed" in out
    assert "tokenizer.model: sha256 differs" in out


def test_distribution_from_histogram_matches_polars_on_raw_values():
    import random

    import polars as pl
    from mmae.pipelines.inspect.stats import _distribution_from_counts

    rng = random.Random(1)
    for size in (1, 2, 7, 100, 1001):
        values = [rng.randint(0, 40) for _ in range(size)]
        frame = pl.DataFrame({"v": values})
        counts = frame.group_by("v").agg(pl.len().alias("n"))
        got = _distribution_from_counts(counts["v"].to_list(), counts["n"].to_list())
        column = frame["v"]
        assert got["count"] == size and got["min"] == column.min() and got["max"] == column.max()
        assert got["mean"] == round(column.mean(), 3)
        assert got["p50"] == column.quantile(0.5, "nearest") and got["p95"] == column.quantile(0.95, "nearest")
