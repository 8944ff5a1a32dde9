"""Peak memory of `mmae build` as the dataset grows: it must stay flat.

    .venv/bin/python benchmarks/build_memory.py [--sizes 5000 20000 80000] [--output-size 256]

Unique ~320 px JPEGs served from a loopback server; the same config at each size, with the
default embedded runner and with the 2-process runner. For each run: the peak RSS of the
largest single process (getrusage) and the peak of the whole process tree's summed RSS
(sampled from /proc every 0.2 s). Target: flat, within 10% plus a constant across the sizes.
The tokenizer's training sample is such a constant (at most `tokenizer.sample_size` texts, 5,000
here so that it is full at every size; `--sample-size 200000` measures the default).
`--peer` adds img2dataset (same URLs, output size and resize mode) at each size, side by side.
`--quality` turns every data.quality rule on (build_throughput.QUALITY_ON), near-duplicates included.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmae.pipelines.demo.serve import WebBehaviour, serve_weblike  # noqa: E402

from benchmarks.build_throughput import QUALITY_ON  # noqa: E402


def make_images(folder: Path, count: int, side: int = 320, seed: int = 0) -> None:
    """Cheap unique JPEGs: a coloured background, a few shapes, the index drawn in."""
    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    existing = len(list((folder / "img").glob("*.jpg")))
    for index in range(existing, count):
        image = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y, r = rng.randrange(side), rng.randrange(side), rng.randrange(10, side // 3)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        draw.text((10, 10), str(index), fill=(255, 255, 255))
        image.save(folder / "img" / f"{index:06d}.jpg", quality=85)


def _tree_rss_kb(root_pid: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss[int(entry)] = int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def measure(command: list[str], log: Path) -> tuple[float, float, float]:
    """(wall s, peak summed RSS of the process tree in MB, peak RSS of the largest process in MB)."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.2):
                peak = max(peak, _tree_rss_kb(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        stop.set()
        sampler.join()
    if status != 0:
        sys.exit(f"{command} failed ({status}); see {log}")
    return time.perf_counter() - started, peak / 1024, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000])
    parser.add_argument("--output-size", type=int, default=256)
    parser.add_argument("--runners", nargs="+", default=["default", "2-process"], choices=["default", "2-process"])
    parser.add_argument("--quality", action="store_true", help="every data.quality rule on (QUALITY_ON)")
    parser.add_argument("--peer", action="store_true", help="also measure img2dataset, 1 and 2 processes as the runners")
    parser.add_argument("--work", default=str(ROOT / "build" / "bench_memory"))
    parser.add_argument("--rows-per-shard", type=int, default=1000,
                        help="shards.rows_per_shard, the same at every size; small enough that even the smallest "
                        "build has a shard for each worker to write at the end (with a single shard, one "
                        "process writes while the other idles, and the tree's peak is lower for that reason alone)")
    parser.add_argument("--sample-size", type=int, default=5000,
                        help="tokenizer.sample_size: the tokenizer's sample is bounded by it, not by the dataset; "
                             "the default keeps it the same at every size so what grows with rows shows")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    make_images(work / "raw", max(args.sizes))
    print(f"corpus: {max(args.sizes)} JPEGs of 320 px, ready in {time.perf_counter() - started:.0f}s", flush=True)
    results = []
    with serve_weblike(str(work / "raw"), WebBehaviour(instant=True)) as server:
        for size in args.sizes:
            urls = work / f"urls-{size}.jsonl"
            with open(urls, "w") as handle:
                for index in range(size):
                    handle.write(json.dumps({"url": f"{server.base_url}img/{index:06d}.jpg",
                                             "caption": f"picture {index} of shapes"}) + "\n")
            if args.peer:
                import pyarrow.json as pajson
                import pyarrow.parquet as pq

                pq.write_table(pajson.read_json(urls), work / f"urls-{size}.parquet")
                for runner in args.runners:
                    processes = 2 if runner == "2-process" else 1
                    out = work / f"i2d-{size}-{runner}"
                    shutil.rmtree(out, ignore_errors=True)
                    command = [str(Path(sys.executable).parent / "img2dataset"), "--url_list",
                               str(work / f"urls-{size}.parquet"), "--input_format", "parquet", "--url_col", "url",
                               "--caption_col", "caption", "--output_format", "parquet", "--output_folder", str(out),
                               "--processes_count", str(processes), "--thread_count", "128",
                               "--image_size", str(args.output_size), "--resize_mode", "center_crop",
                               "--distributor", "multiprocessing", "--enable_wandb", "False"]
                    wall, tree, largest = measure(command, work / f"log-i2d-{size}-{runner}.txt")
                    written = sum(pq.read_table(path, columns=["status"]).column("status").to_pylist().count("success")
                                  for path in out.glob("*.parquet"))
                    results.append((f"i2d {runner}", size, written, wall, tree, largest))
                    print(f"img2dataset {runner:<10} {size:>7} images: {written} written in {wall:.0f}s, "
                          f"peak RSS tree {tree:.0f} MB, largest process {largest:.0f} MB", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            for runner in args.runners:
                out = work / f"out-{size}-{runner}"
                shutil.rmtree(out, ignore_errors=True)
                config = work / "pipeline.yaml"
                config.write_text(json.dumps({"data": {
                    "output": str(out),
                    "sources": [{"name": "bench", "kind": "paired", "path": str(urls)}],
                    "download": {"allowed_networks": ["127.0.0.1/32"]},
                    "image": {"size": args.output_size, "resize_mode": "center_crop"},
                    "tokenizer": {"sample_size": args.sample_size},
                    "shards": {"rows_per_shard": args.rows_per_shard},
                    **({"quality": QUALITY_ON} if args.quality else {}),
                }}))
                command = [str(Path(sys.executable).parent / "mmae"), "build", "--config", str(config)]
                if runner == "2-process":
                    command += ["--", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
                wall, tree, largest = measure(command, work / f"log-{size}-{runner}.txt")
                written = json.loads((out / "build_report.json").read_text())["written"]["paired"]
                results.append((runner, size, written, wall, tree, largest))
                print(f"{runner:<10} {size:>7} images: {written} written in {wall:.0f}s, peak RSS tree {tree:.0f} MB, "
                      f"largest process {largest:.0f} MB", flush=True)
                shutil.rmtree(out, ignore_errors=True)

    print(f"\n{'runner':<16} {'images':>7} {'written':>8} {'wall s':>7} {'tree MB':>8} {'largest MB':>11} "
          f"{'vs smallest':>12}")
    for runner, size, written, wall, tree, largest in results:
        base = next(r for r in results if r[0] == runner)
        print(f"{runner:<16} {size:>7} {written:>8} {wall:>7.0f} {tree:>8.0f} {largest:>11.0f} "
              f"{tree / base[4]:>11.2f}x")


if __name__ == "__main__":
    main()
