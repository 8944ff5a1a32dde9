"""`mmae build --append` vs what an img2dataset user does today: add a URL list as big as the
dataset to a finished download.

    .venv/bin/python benchmarks/build_append.py [--images 5000] [--overlap 0.1] [--mode web|instant]

A finished build of `--images` URLs; then a second list of as many rows is appended to the same
file, of which `--overlap` repeat URLs the dataset already has (a re-crawl overlaps). The server
counts requests per path. mmae: `--append`, which should request only the new URLs, once each,
leave every old shard byte-identical (sha256 before and after) and reject the repeats as
duplicates naming the old row. img2dataset cannot add to a finished output: its user downloads
the combined list again into a new folder (every URL requested again), or the second list alone
into another folder (no dedup against the first; the repeats are downloaded and stored twice).
Both tools: 2 processes, the same threads, timeout, output size and server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmae.pipelines.demo.serve import WebBehaviour, serve_weblike  # noqa: E402

from benchmarks.build_memory import make_images  # noqa: E402


def checksums(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for kind in ("paired", "rejects") for path in sorted((folder / kind).glob("*.parquet"))}


def timed(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{command[:3]} failed ({done.returncode}); see {log}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="rows of the first list, and of the second")
    parser.add_argument("--overlap", type=float, default=0.1, help="share of the second list the first has")
    parser.add_argument("--mode", choices=["web", "instant"], default="web")
    parser.add_argument("--work", default=str(ROOT / "build" / "bench_append"))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    make_images(work / "raw", 2 * args.images)
    draw = random.Random(0)
    first = [f"img/{index:06d}.jpg" for index in range(args.images)]
    repeats = draw.sample(first, int(args.images * args.overlap))
    second = repeats + [f"img/{index:06d}.jpg" for index in range(args.images, 2 * args.images - len(repeats))]
    draw.shuffle(second)
    bin_dir = Path(sys.executable).parent
    threads, timeout = 64, 3.0
    with serve_weblike(str(work / "raw"), WebBehaviour(instant=args.mode == "instant", hang_s=timeout * 10)) as server:
        rows = lambda paths, start: [{"url": server.base_url + path, "caption": f"picture {start + i} of shapes"}  # noqa: E731
                                     for i, path in enumerate(paths)]
        urls = work / "urls.jsonl"
        urls.write_text("".join(json.dumps(row) + "\n" for row in rows(first, 0)))
        out = work / "mmae"
        config = work / "pipeline.yaml"
        config.write_text(json.dumps({"data": {
            "output": str(out), "sources": [{"name": "web", "kind": "paired", "path": str(urls)}],
            "download": {"threads": threads, "timeout_s": timeout, "retries": 0, "allowed_networks": ["127.0.0.1/32"]},
            "image": {"size": 64}, "shards": {"rows_per_shard": 1000}}}))
        beam = ["--", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
        first_s = timed([str(bin_dir / "mmae"), "build", "--config", str(config), *beam], work / "first.log")
        first_requests = sum(server.hits.values())
        before = checksums(out)
        server.hits.clear()
        with open(urls, "a") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows(second, args.images)))
        append_s = timed([str(bin_dir / "mmae"), "build", "--config", str(config), "--append", *beam], work / "append.log")
        append_requests = sum(server.hits.values())
        repeated = sum(server.hits[f"/{path}"] for path in repeats)
        after = checksums(out)
        unchanged = all(after.get(name) == digest for name, digest in before.items())
        report = json.loads((out / "build_report.json").read_text())

        server.hits.clear()
        i2d = work / "img2dataset"
        combined = work / "combined.parquet"
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows(first, 0) + rows(second, args.images)), combined)
        i2d_s = timed([str(bin_dir / "img2dataset"), "--url_list", str(combined), "--input_format", "parquet",
                       "--url_col", "url", "--caption_col", "caption", "--output_format", "parquet",
                       "--output_folder", str(i2d), "--processes_count", "2", "--thread_count", str(threads),
                       "--image_size", "64", "--resize_mode", "center_crop", "--timeout", str(timeout), "--retries", "0",
                       "--distributor", "multiprocessing", "--enable_wandb", "False"], work / "img2dataset.log")
        i2d_requests = sum(server.hits.values())

    new = len(second) - len(repeats)
    print(f"\n{args.images} rows built ({first_requests} requests, {first_s:.0f} s), then {len(second)} rows appended "
          f"({len(repeats)} of them URLs the dataset has), {args.mode} server, 2 processes")
    print(f"{'':<36}{'requests':>10}{'wall s':>9}")
    print(f"{'mmae build --append':<36}{append_requests:>10}{append_s:>9.1f}   (new URLs: {new}; repeats requested: "
          f"{repeated})")
    print(f"{'img2dataset, combined list again':<36}{i2d_requests:>10}{i2d_s:>9.1f}")
    print(f"old shards and rejects unchanged (sha256): {unchanged} ({len(before)} files); rows now "
          f"{sum(report['written'].values())}, duplicates rejected {report['reasons'].get('duplicate', 0)}")


if __name__ == "__main__":
    main()
