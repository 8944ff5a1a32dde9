"""Peak memory of `mmae build` on a URL list holding one very long line, at L and 4L bytes.

A stranger's JSONL can hold one line of hundreds of megabytes (a pasted blob; a small .gz that
expands to one line). A reader that holds whole lines needs memory proportional to the longest
one; mmae's reader holds at most `data.max_row_bytes` of a line. This prints the peak RSS of a
whole build (driver and embedded runner in one process) with the long line at L and at 4L, and
their ratio (flat = 1.0).

    python benchmarks/long_lines.py              # L = 50 MB and 200 MB
    python benchmarks/long_lines.py --mb 100
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image


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


def peak_rss_mb(config: Path) -> tuple[float, dict]:
    """Peak RSS of one `mmae build` in a child process (ru_maxrss of that child alone)."""
    code = ("import json, resource, sys; from mmae.cli import main; rc = main(['build', '--config', sys.argv[1]]); "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True)
    line = [text for text in done.stderr.splitlines() if text.startswith("RSS ")]
    if not line:
        raise SystemExit(f"the build failed:\n{done.stderr[-3000:]}")
    _, rss_kb, code_ = line[-1].split()
    report = json.loads((config.parent / "out" / "build_report.json").read_text())
    return int(rss_kb) / 1024, {"exit": int(code_), "read": report["read"], "reasons": report["reasons"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="L: the long line's size in MB (4L is run too)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = []
        for megabytes in (args.mb, 4 * args.mb):
            config = make_corpus(Path(folder) / f"l{megabytes}", megabytes)
            rss, report = peak_rss_mb(config)
            results.append(rss)
            print(f"line of {megabytes:>4} MB: peak RSS {rss:7.0f} MB  exit {report['exit']}  read {report['read']}  "
                  f"rejects {report['reasons']}")
        print(f"peak RSS at 4L / at L: {results[1] / results[0]:.2f} (1.00 = memory independent of the line)")


if __name__ == "__main__":
    main()
