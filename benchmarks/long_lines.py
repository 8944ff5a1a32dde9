"""Peak memory of `mmae build` on a URL list holding one very long line, at L and 4L bytes.

A stranger's JSONL can hold one line of hundreds of megabytes (a pasted blob; a small .gz that
expands to one line). A reader that holds whole lines needs memory proportional to the longest
one; mmae's reader holds at most `data.max_row_bytes` of a line. This prints the peak RSS of a
whole build (driver and embedded runner in one process) with the long line at L and at 4L, and
their ratio (flat = 1.0).

    python benchmarks/long_lines.py --peer       # L = 50 MB and 200 MB, img2dataset beside mmae
    python benchmarks/long_lines.py --mb 100
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_memory import _tree_rss_kb as tree_rss_kb  # noqa: E402


def make_corpus(folder: Path, megabytes: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG")
    (folder / "a.jpg").write_bytes(buffer.getvalue())
    with gzip.open(folder / "list.jsonl.gz", "wt", compresslevel=1) as handle:
        handle.write(json.dumps({"url": "a.jpg", "caption": "a red square"}) + "\n")
        handle.write('{"url": "a.jpg", "caption": "')
        piece = "word " * 200_000  # 1 MB
        for _ in range(megabytes):
            handle.write(piece)
        handle.write('"}\n')
        handle.write(json.dumps({"url": "a.jpg", "caption": "the same red square again"}) + "\n")
    config = {"data": {"output": str(folder / "out"), "sources": [
        {"name": "p", "kind": "paired", "path": str(folder / "list.jsonl.gz")}],
        "tokenizer": {"vocab_size": 60}, "image": {"size": 32, "min_size": 16}}}
    (folder / "pipeline.yaml").write_text(json.dumps(config))
    return folder / "pipeline.yaml"


def measure(command: list[str], log: Path) -> tuple[int, float, float]:
    """(exit status, peak summed RSS of the process tree in MB, peak RSS of its largest process in MB)."""
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.1):
                peak = max(peak, tree_rss_kb(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        stop.set()
        sampler.join()
    return os.waitstatus_to_exitcode(status), peak / 1024, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="L: the long line's size in MB (4L is run too)")
    parser.add_argument("--peer", action="store_true", help="also run img2dataset on the same file")
    args = parser.parse_args()
    binaries = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as folder:
        rows = {}
        for megabytes in (args.mb, 4 * args.mb):
            config = make_corpus(Path(folder) / f"l{megabytes}", megabytes)
            tools = {"mmae build": [str(binaries / "mmae"), "build", "--config", str(config)]}
            if args.peer:
                tools["img2dataset"] = [
                    str(binaries / "img2dataset"), "--url_list", str(config.parent / "list.jsonl.gz"),
                    "--input_format", "jsonl.gz", "--url_col", "url", "--caption_col", "caption",
                    "--output_format", "parquet", "--output_folder", str(config.parent / "i2d"),
                    "--processes_count", "1", "--thread_count", "16", "--image_size", "32",
                    "--distributor", "multiprocessing", "--enable_wandb", "False"]
            for tool, command in tools.items():
                code, tree, largest = measure(command, config.parent / f"{tool.split()[0]}.log")
                rows[(tool, megabytes)] = tree
                print(f"{tool:<12} line of {megabytes:>4} MB: exit {code}, peak RSS of the process tree "
                      f"{tree:7.0f} MB (largest process {largest:.0f} MB)", flush=True)
            report = json.loads((config.parent / "out" / "build_report.json").read_text())
            print(f"{'':<12} mmae: read {report['read']}, rejects {report['reasons']}")
        for tool in sorted({tool for tool, _ in rows}):
            print(f"{tool}: peak at 4L / at L = {rows[(tool, 4 * args.mb)] / rows[(tool, args.mb)]:.2f} "
                  "(1.00 = memory independent of the line)")
        if args.peer:
            for megabytes in (args.mb, 4 * args.mb):
                print(f"line of {megabytes} MB: img2dataset / mmae peak = "
                      f"{rows[('img2dataset', megabytes)] / rows[('mmae build', megabytes)]:.1f}x")


if __name__ == "__main__":
    main()
