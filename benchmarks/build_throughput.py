"""`mmae build` vs the `img2dataset` CLI on the same URL list, side by side.

    .venv/bin/python benchmarks/build_throughput.py [--images 10000] [--sizes 64 256] [--modes instant web]

Both download the same ~512 px JPEGs from a loopback HTTP server, resize them to the same size
with the same mode, and write Parquet with the same number of processes. Two servers:
- `instant`: answers at once and never fails (the best case; hides what users meet);
- `web`: like the web, decided per path by a seeded hash so both tools meet the same web —
  20-150 ms latency per request, 3% of requests hang past the timeout, 5% answer 404.
Both tools use a 3 s timeout and no retries. mmae also cleans and tokenizes captions (training
a SentencePiece model), deduplicates, stages chunks for resume, and writes schema'd shards,
rejects, a manifest and a report. Times are whole-command wall clock, startup included.
`--quality` turns every data.quality rule on for mmae (`QUALITY_ON`: near-duplicate images and
captions, file-name and boilerplate captions, length, repetition, letter share, language).
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

from mmae.pipelines.demo.serve import WebBehaviour, serve_weblike  # noqa: E402


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


# Every data.quality rule on, at the values the README documents (benchmarks/build_memory.py too).
QUALITY_ON = {"near_duplicate_images": 8, "near_duplicate_texts": 0.7, "near_duplicate_captions": True,
              "reject_file_names": True, "reject_boilerplate": True, "max_words": 200, "max_top_word_share": 0.5,
              "max_repeated_trigram_share": 0.5, "min_alpha_share": 0.5, "languages": ["en"]}


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


def run_img2dataset(work: Path, bin_dir: Path, size: int, args) -> tuple[int, float]:
    out = work / f"img2dataset-{size}"
    shutil.rmtree(out, ignore_errors=True)
    seconds = run([
        str(bin_dir / "img2dataset"), "--url_list", str(work / "urls.parquet"), "--input_format", "parquet",
        "--url_col", "url", "--caption_col", "caption", "--output_format", "parquet",
        "--output_folder", str(out), "--processes_count", str(args.processes),
        "--thread_count", str(args.threads), "--image_size", str(size), "--resize_mode", "center_crop",
        "--encode_format", "jpg", "--encode_quality", "90", "--number_sample_per_shard", "1000",
        "--timeout", str(args.timeout), "--retries", "0",
        "--distributor", "multiprocessing", "--enable_wandb", "False",
    ], work / f"img2dataset-{size}.log")
    return count_img2dataset(out), seconds


def run_mmae(work: Path, bin_dir: Path, size: int, processes: int, args) -> tuple[int, float]:
    out = work / f"mmae-{size}-{processes}"
    shutil.rmtree(out, ignore_errors=True)
    config = work / "pipeline.yaml"
    config.write_text(json.dumps({"data": {
        "output": str(out),
        "sources": [{"name": "bench", "kind": "paired", "path": str(work / "urls.jsonl")}],
        "download": {"threads": args.threads, "timeout_s": args.timeout, "retries": 0,
                     "allowed_networks": ["127.0.0.1/32"]},
        "image": {"size": size, "resize_mode": "center_crop", "format": "jpeg", "quality": 90},
        "shards": {"rows_per_shard": 1000},
        **({"quality": QUALITY_ON} if args.quality else {}),
    }}))
    beam_args = []
    if processes > 1:
        beam_args = ["--", f"--direct_num_workers={processes}", "--direct_running_mode=multi_processing"]
    seconds = run([str(bin_dir / "mmae"), "build", "--config", str(config), *beam_args],
                  work / f"mmae-{size}-{processes}.log")
    report = json.loads((out / "build_report.json").read_text())
    return report["written"]["paired"], seconds


def median_run(runs: list[tuple[int, float]]) -> tuple[int, float]:
    """The run with the median time (rows kept, seconds)."""
    return sorted(runs, key=lambda run: run[1])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="output image sides")
    parser.add_argument("--modes", nargs="+", default=["instant", "web"], choices=["instant", "web"])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--quality", action="store_true", help="mmae with every data.quality rule on (QUALITY_ON)")
    parser.add_argument("--single", action="store_true", help="also time mmae's default one-process runner")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each tool per mode and size, alternating; the median time counts "
                        "(one run on 2 shared cores varies by +-10%%)")
    parser.add_argument("--work", default=str(ROOT / "build" / "bench_build"))
    args = parser.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    raw = work / "raw"
    started = time.perf_counter()
    rows = make_images(raw, args.images, args.side)
    mean_kb = sum((raw / row["url"]).stat().st_size for row in rows) / len(rows) / 1024
    print(f"corpus: {len(rows)} JPEGs of {args.side}px (mean {mean_kb:.0f} KB), made in "
          f"{time.perf_counter() - started:.1f}s", flush=True)

    bin_dir = Path(sys.executable).parent
    results = []
    for mode in args.modes:
        behaviour = WebBehaviour(instant=mode == "instant", hang_s=args.timeout * 10)
        with serve_weblike(str(raw), behaviour) as server:
            absolute = [{"url": server.base_url + row["url"], "caption": row["caption"]} for row in rows]
            pq.write_table(pa.Table.from_pylist(absolute), work / "urls.parquet")
            with open(work / "urls.jsonl", "w") as handle:
                for row in absolute:
                    handle.write(json.dumps(row) + "\n")
            for size in args.sizes:
                i2d_runs, mmae_runs = [], []
                for _ in range(args.repeats):  # alternate, so a slow spell of the machine hits both
                    i2d_runs.append(run_img2dataset(work, bin_dir, size, args))
                    mmae_runs.append(run_mmae(work, bin_dir, size, args.processes, args))
                i2d_ok, i2d_s = median_run(i2d_runs)
                mmae_ok, mmae_s = median_run(mmae_runs)
                line = {"mode": mode, "size": size, "i2d": (i2d_ok, i2d_s), "mmae": (mmae_ok, mmae_s)}
                if args.single:
                    line["single"] = run_mmae(work, bin_dir, size, 1, args)
                psnr = mean_psnr(work / f"img2dataset-{size}", work / f"mmae-{size}-{args.processes}")
                line["psnr"] = psnr
                results.append(line)
                ratio = (mmae_ok / mmae_s) / (i2d_ok / i2d_s)
                print(f"{mode:<8} {size:>4}px  img2dataset {i2d_ok} ok in {i2d_s:.1f}s  mmae {mmae_ok} ok in "
                      f"{mmae_s:.1f}s  ratio {ratio:.2f}x  PSNR {psnr:.1f} dB  (runs: img2dataset "
                      f"{', '.join(f'{s:.1f}' for _, s in i2d_runs)}; mmae {', '.join(f'{s:.1f}' for _, s in mmae_runs)})",
                      flush=True)

    print(f"\n{args.images} URLs, {args.side}px JPEGs -> center_crop, JPEG q90, {args.threads} threads, "
          f"timeout {args.timeout}s, no retries, {args.processes} processes each, median of {args.repeats} runs"
          + (", mmae with every data.quality rule on" if args.quality else ""))
    print(f"{'server':<8} {'size':>5} {'i2d ok':>7} {'i2d s':>7} {'i2d img/s':>10} {'mmae ok':>8} {'mmae s':>7} "
          f"{'mmae img/s':>11} {'ratio':>6}" + ("  mmae 1-proc img/s (ratio)" if args.single else ""))
    for line in results:
        (i2d_ok, i2d_s), (mmae_ok, mmae_s) = line["i2d"], line["mmae"]
        i2d_rate, mmae_rate = i2d_ok / i2d_s, mmae_ok / mmae_s
        extra = ""
        if "single" in line:
            single_rate = line["single"][0] / line["single"][1]
            extra = f"  {single_rate:>8.1f} ({single_rate / i2d_rate:.2f}x)"
        print(f"{line['mode']:<8} {line['size']:>5} {i2d_ok:>7} {i2d_s:>7.1f} {i2d_rate:>10.1f} {mmae_ok:>8} "
              f"{mmae_s:>7.1f} {mmae_rate:>11.1f} {mmae_rate / i2d_rate:>5.2f}x{extra}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS of the largest child process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
