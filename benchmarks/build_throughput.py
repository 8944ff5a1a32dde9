"""`mmae build` vs the `img2dataset` CLI on the same URL list, side by side.

    .venv/bin/python benchmarks/build_throughput.py [--images 3000] [--side 512] [--processes 2]

Both download the same ~512 px JPEGs from a loopback HTTP server, resize them to the same size
with the same mode, and write Parquet with the same number of processes. mmae also cleans and
tokenizes captions (training a SentencePiece model), deduplicates, and writes schema'd shards,
rejects, a manifest and a report. Times are whole-command wall clock, startup included.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.demo.serve import serve_directory  # noqa: E402


def make_images(folder: Path, count: int, side: int, seed: int = 0) -> list[dict]:
    """Photo-like JPEGs (smooth gradients, shapes, noise): about 30-60 KB each at 512 px."""
    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    noise = Image.effect_noise((side, side), 40).convert("RGB")
    rows = []
    for index in range(count):
        base = Image.linear_gradient("L").resize((side, side)).convert("RGB")
        tint = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        image = Image.blend(base, tint, 0.6)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(side), rng.randrange(side)
            r = rng.randrange(side // 16, side // 4)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        image = Image.blend(image, noise, 0.15)
        name = f"img/{index:06d}.jpg"
        image.save(folder / name, quality=90)
        rows.append({"url": name, "caption": f"a picture number {index} with {rng.randint(1, 9)} round shapes"})
    return rows


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"{command[0]} failed ({completed.returncode}); see {log}")
    return elapsed


def count_img2dataset(output: Path) -> int:
    total = 0
    for path in output.glob("*.parquet"):
        table = pq.read_table(path, columns=["status"])
        total += sum(1 for status in table.column("status").to_pylist() if status == "success")
    return total


def mean_psnr(i2d_out: Path, mmae_out: Path, limit: int = 200) -> float:
    """Agreement of the two tools' resized images (same URL), in dB: > 30 is visually identical."""
    import math

    import numpy as np

    theirs = {}
    for path in i2d_out.glob("*.parquet"):
        for row in pq.read_table(path, columns=["url", "jpg"]).to_pylist():
            if row["jpg"]:
                theirs[row["url"]] = row["jpg"]
    scores = []
    for path in sorted((mmae_out / "paired").glob("part-*.parquet")):
        for row in pq.read_table(path, columns=["url", "image"]).to_pylist():
            if row["url"] in theirs and len(scores) < limit:
                a = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), dtype=np.float64)
                b = np.asarray(Image.open(io.BytesIO(theirs[row["url"]])).convert("RGB"), dtype=np.float64)
                mse = float(((a - b) ** 2).mean())
                scores.append(99.0 if mse == 0 else 10 * math.log10(255**2 / mse))
    return sum(scores) / max(1, len(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--size", type=int, default=64, help="output image side")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--work", default=str(ROOT / "build" / "bench_build"))
    args = parser.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    raw = work / "raw"
    started = time.perf_counter()
    rows = make_images(raw, args.images, args.side)
    mean_kb = sum((raw / row["url"]).stat().st_size for row in rows) / len(rows) / 1024
    print(f"corpus: {len(rows)} JPEGs of {args.side}px (mean {mean_kb:.0f} KB), made in {time.perf_counter() - started:.1f}s")

    bin_dir = Path(sys.executable).parent
    with serve_directory(str(raw)) as base_url:
        absolute = [{"url": base_url + row["url"], "caption": row["caption"]} for row in rows]
        pq.write_table(pa.Table.from_pylist(absolute), work / "urls.parquet")
        with open(work / "urls.jsonl", "w") as handle:
            for row in absolute:
                handle.write(json.dumps(row) + "\n")

        i2d_out = work / "img2dataset"
        i2d_time = run([
            str(bin_dir / "img2dataset"), "--url_list", str(work / "urls.parquet"), "--input_format", "parquet",
            "--url_col", "url", "--caption_col", "caption", "--output_format", "parquet",
            "--output_folder", str(i2d_out), "--processes_count", str(args.processes),
            "--thread_count", str(args.threads), "--image_size", str(args.size), "--resize_mode", "center_crop",
            "--encode_format", "jpg", "--encode_quality", "90", "--number_sample_per_shard", "1000",
            "--distributor", "multiprocessing", "--enable_wandb", "False",
        ], work / "img2dataset.log")
        i2d_ok = count_img2dataset(i2d_out)

        config = work / "pipeline.yaml"
        config.write_text(json.dumps({"data": {
            "output": str(work / "mmae"),
            "sources": [{"name": "bench", "kind": "paired", "path": str(work / "urls.jsonl")}],
            "download": {"threads": args.threads, "allowed_networks": ["127.0.0.1/32"]},
            "image": {"size": args.size, "resize_mode": "center_crop", "format": "jpeg", "quality": 90},
            "shards": {"rows_per_shard": 1000},
        }}))
        beam_args = ["--", f"--direct_num_workers={args.processes}", "--direct_running_mode=multi_processing"]
        mmae_time = run([str(bin_dir / "mmae"), "build", "--config", str(config), *beam_args],
                        work / "mmae.log")
        report = json.loads((work / "mmae" / "build_report.json").read_text())
        mmae_ok = report["written"]["paired"]
        # The default embedded runner: one process, whose pool threads decode in parallel.
        single_time = run([str(bin_dir / "mmae"), "build", "--config", str(config), "--overwrite"],
                          work / "mmae-single.log")
        single_ok = json.loads((work / "mmae" / "build_report.json").read_text())["written"]["paired"]

    i2d_rate, mmae_rate = i2d_ok / i2d_time, mmae_ok / mmae_time
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\n{'tool':<12} {'images ok':>10} {'wall s':>8} {'images/s':>9}")
    print(f"{'img2dataset':<12} {i2d_ok:>10} {i2d_time:>8.1f} {i2d_rate:>9.1f}")
    print(f"{'mmae build':<12} {mmae_ok:>10} {mmae_time:>8.1f} {mmae_rate:>9.1f}   "
          f"(--direct_num_workers={args.processes} --direct_running_mode=multi_processing)")
    single_rate = single_ok / single_time
    print(f"{'mmae build':<12} {single_ok:>10} {single_time:>8.1f} {single_rate:>9.1f}   (default: one process)")
    print(f"\nratio mmae / img2dataset, same number of processes ({args.processes}): {mmae_rate / i2d_rate:.2f}x")
    print(f"ratio mmae default runner / img2dataset: {single_rate / i2d_rate:.2f}x")
    print(f"({args.threads} threads, {args.side}px -> {args.size}px center_crop, JPEG q90)")
    print(f"output agreement with img2dataset (mean PSNR over 200 images): "
          f"{mean_psnr(work / 'img2dataset', work / 'mmae'):.1f} dB")
    print(f"mmae's own report: {report['images_per_s']} images/s over {report['wall_time_s']} s of pipeline time")
    print(f"peak RSS of the largest child process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
