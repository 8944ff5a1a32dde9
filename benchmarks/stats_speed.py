"""`mmae stats` vs the pandas script a user would otherwise write, on >= 1 M metadata rows.

    .venv/bin/python benchmarks/stats_speed.py [--rows 1000000]

Synthesises a dataset directly as schema-v1 Parquet (tiny images, ~20 tokens per caption,
10 shards + rejects + a manifest + a tokenizer), then runs, each in a fresh process:
  mmae:   pipelines.inspect.stats.compute_stats (polars lazy scans, column projection, footers)
  pandas: pd.read_parquet of every full file, concat, then the same aggregates
and prints both times, the ratio and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fresh_process import last_line  # noqa: E402

WORDS = np.array("a the red green blue small large circle square on at top left right of picture with two one three".split())


def _write(table: pa.Table, path: Path) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    compression = {name: ("none" if name == "image" else "zstd") for name in table.schema.names}
    pq.write_table(table, path, row_group_size=256, compression=compression)
    data = path.read_bytes()
    return {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def synthesise(root: Path, rows: int, shards: int = 10, seed: int = 0) -> None:
    from mmae.pipelines.builder.tokenizer import train_sentencepiece
    from mmae.schemas.config import TokenizerConfig
    from mmae.schemas.shard import REJECT_SCHEMA, SHARD_SCHEMA

    rng = np.random.default_rng(seed)
    captions = [" ".join(rng.choice(WORDS, 12)) for _ in range(2000)]
    model = train_sentencepiece(captions, TokenizerConfig(vocab_size=200))
    import sentencepiece as spm

    vocab_size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    (root / "tokenizer.model").parent.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(model)
    entries = []
    kinds = ["paired", "image", "text"]
    per_shard = rows // shards
    for index in range(shards):
        kind = kinds[index % 3]
        n = per_shard
        ids = pa.array([f"{value:020x}" for value in rng.integers(0, 2**63, n)])
        lengths = rng.integers(5, 40, n) if kind != "image" else np.zeros(n, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(1, vocab_size, offsets[-1]).astype(np.int32)))
        if kind == "image":
            tokens = pa.nulls(n, pa.list_(pa.int32()))
        has_image = kind != "text"
        image_blob = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        sizes = rng.integers(32, 512, n).astype(np.int32)
        columns = {
            "id": ids,
            "source": pa.array([f"source-{index % 4}"] * n),
            "kind": pa.array([kind] * n),
            "url": pa.array([f"http://x/{i}.jpg" for i in range(n)]) if has_image else pa.nulls(n, pa.string()),
            "caption": pa.array([captions[i % 2000] for i in range(n)]) if kind != "image" else pa.nulls(n, pa.string()),
            "tokens": tokens,
            "image": pa.array([image_blob + i.to_bytes(4, "little") for i in range(n)], pa.binary())
            if has_image else pa.nulls(n, pa.binary()),
            "image_format": pa.array(["jpeg"] * n) if has_image else pa.nulls(n, pa.string()),
            "width": pa.array(np.full(n, 64, np.int32)) if has_image else pa.nulls(n, pa.int32()),
            "height": pa.array(np.full(n, 64, np.int32)) if has_image else pa.nulls(n, pa.int32()),
            "original_width": pa.array(sizes) if has_image else pa.nulls(n, pa.int32()),
            "original_height": pa.array(sizes) if has_image else pa.nulls(n, pa.int32()),
            "image_sha256": ids if has_image else pa.nulls(n, pa.string()),
            "label": pa.array(rng.choice(["circle", "square", "cross"], n)) if kind == "paired" else pa.nulls(n, pa.string()),
        }
        table = pa.table(columns, schema=SHARD_SCHEMA)
        relative = f"{kind}/part-{index:05d}-of-{shards:05d}.parquet"
        entries.append({"path": relative, "kind": kind, **_write(table, root / relative)})
    n_rejects = rows // 20
    rejects = pa.table({
        "id": pa.array([f"{v:020x}" for v in rng.integers(0, 2**63, n_rejects)]),
        "source": pa.array(["source-0"] * n_rejects), "kind": pa.array(["paired"] * n_rejects),
        "key": pa.array([f"f.jsonl:{i}" for i in range(n_rejects)]), "url": pa.nulls(n_rejects, pa.string()),
        "reason": pa.array(rng.choice(["http_404", "timeout", "duplicate", "decode_error"], n_rejects)),
        "detail": pa.array([""] * n_rejects),
    }, schema=REJECT_SCHEMA)
    reject_entry = {"path": "rejects/part-00000-of-00001.parquet", "kind": "rejects",
                    **_write(rejects, root / "rejects/part-00000-of-00001.parquet")}
    manifest = {
        "schema_version": "1",
        "rows": {kind: sum(e["rows"] for e in entries if e["kind"] == kind) for kind in kinds},
        "shards": entries, "rejects": [reject_entry], "rejected": n_rejects,
        "tokenizer": {"path": "tokenizer.model", "sha256": hashlib.sha256(model).hexdigest(), "vocab_size": vocab_size,
                      "special_ids": {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}},
        "config": {"text": {"max_tokens": 32}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


MMAE_CODE = """
import resource, sys, time, json
sys.path.insert(0, {root!r})
started = time.perf_counter()
from mmae.pipelines.inspect.dataset import Dataset
from mmae.pipelines.inspect.stats import compute_stats
stats = compute_stats(Dataset.open({data!r}))
print(json.dumps({{"seconds": time.perf_counter() - started, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": stats["rows"], "mean_tokens": stats["tokens"]["mean"]}}))
"""

PANDAS_CODE = """
import resource, sys, time, json, glob
started = time.perf_counter()
import numpy as np
import pandas as pd
import sentencepiece as spm
root = {data!r}
frames = [pd.read_parquet(path) for kind in ("paired", "image", "text") for path in sorted(glob.glob(f"{{root}}/{{kind}}/*.parquet"))]
df = pd.concat(frames, ignore_index=True)
rejects = pd.read_parquet(glob.glob(f"{{root}}/rejects/*.parquet")[0])
out = {{}}
out["rows"] = df.groupby("kind").size().to_dict()
out["rows_by_source"] = df.groupby(["kind", "source"]).size().to_dict()
out["rejected"] = rejects.groupby("reason").size().to_dict()
lengths = df["tokens"].dropna().map(len)
out["tokens"] = dict(mean=lengths.mean(), p50=lengths.quantile(0.5), p95=lengths.quantile(0.95), max=lengths.max(),
                     truncated=(lengths >= 32).mean())
images = df[df["kind"] != "text"]
for column in ("width", "height", "original_width", "original_height"):
    out[column] = images[column].describe(percentiles=[0.5, 0.95]).to_dict()
out["bytes_per_image"] = images["image"].map(len).mean()
out["labels"] = df["label"].value_counts().to_dict()
out["same_image"] = len(images) - images["image_sha256"].nunique()
flat = df["tokens"].dropna().explode()
out["unknown_share"] = (flat == 1).mean()
processor = spm.SentencePieceProcessor(model_file=f"{{root}}/tokenizer.model")
out["top"] = [(processor.id_to_piece(int(t)), int(n)) for t, n in flat.value_counts().head(20).items()]
print(json.dumps({{"seconds": time.perf_counter() - started, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": {{k: int(v) for k, v in out["rows"].items()}}, "mean_tokens": float(out["tokens"]["mean"])}}))
"""


def measure(code: str) -> dict:
    return json.loads(last_line(code))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work", default=str(ROOT / "build" / "bench_stats"))
    args = parser.parse_args()
    data = Path(args.work) / f"rows-{args.rows}"
    if not (data / "manifest.json").exists():
        started = time.perf_counter()
        synthesise(data, args.rows)
        print(f"synthesised {args.rows} rows in {time.perf_counter() - started:.1f}s")
    size_mb = sum(path.stat().st_size for path in data.rglob("*.parquet")) / 1e6
    print(f"dataset: {data} ({size_mb:.0f} MB of Parquet)")
    mmae = measure(MMAE_CODE.format(root=str(ROOT), data=str(data)))
    pandas = measure(PANDAS_CODE.format(data=str(data)))
    assert mmae["rows"] == pandas["rows"], (mmae["rows"], pandas["rows"])
    assert abs(mmae["mean_tokens"] - pandas["mean_tokens"]) < 1e-3  # mmae rounds to 3 places
    print(f"\n{'tool':<22} {'seconds':>8} {'peak RSS MB':>12}")
    print(f"{'mmae stats (polars)':<22} {mmae['seconds']:>8.2f} {mmae['rss_mb']:>12.0f}")
    print(f"{'pandas read_parquet':<22} {pandas['seconds']:>8.2f} {pandas['rss_mb']:>12.0f}")
    print(f"\nspeed-up mmae / pandas: {pandas['seconds'] / mmae['seconds']:.1f}x; "
          f"memory: {mmae['rss_mb'] / pandas['rss_mb']:.2f}x of pandas' (same row counts and mean token length)")


if __name__ == "__main__":
    main()
