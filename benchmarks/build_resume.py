"""A build killed with SIGKILL half-way, then the same command again: how many requests in all?

    .venv/bin/python benchmarks/build_resume.py [--images 8000] [--web] [--processes 1]

The URL list is served from a loopback server that counts requests. The build runs in its own
process group; once half of its chunks are committed it is killed with SIGKILL (no chance to
clean up), then the same command runs to the end. Target: at most 1.1x as many requests as
there are URLs (mmae before chunked staging started over: 1.5x for a kill at half-way). The
result is checked against an uninterrupted build of the same list (same shard checksums).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK_FILES = "[0-9][0-9][0-9][0-9][0-9]-[0-9][0-9][0-9][0-9][0-9][0-9].parquet"  # committed chunks, not parts
sys.path.insert(0, str(ROOT))

from mmae.pipelines.demo.serve import WebBehaviour, serve_weblike  # noqa: E402

from benchmarks.build_memory import make_images  # noqa: E402


def command(config: Path, processes: int) -> list[str]:
    base = [str(Path(sys.executable).parent / "mmae"), "build", "--config", str(config)]
    if processes > 1:
        base += ["--", f"--direct_num_workers={processes}", "--direct_running_mode=multi_processing"]
    return base


def write_config(work: Path, name: str, urls: Path, web: bool) -> Path:
    config = work / f"{name}.yaml"
    config.write_text(json.dumps({"data": {
        "output": str(work / name),
        "sources": [{"name": "bench", "kind": "paired", "path": str(urls)}],
        "download": {"allowed_networks": ["127.0.0.1/32"], "timeout_s": 3, "retries": 0},
        "image": {"size": 64},
        "shards": {"rows_per_shard": 1000},
    }}))
    return config


def checksums(output: Path) -> list[str]:
    manifest = json.loads((output / "manifest.json").read_text())
    return [entry["sha256"] for entry in manifest["shards"] + manifest["rejects"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--web", action="store_true", help="the web-like server (latency, hangs, 404s)")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--work", default=str(ROOT / "build" / "bench_resume"))
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    make_images(work / "raw", args.images)
    behaviour = WebBehaviour(instant=not args.web, hang_s=30)
    with serve_weblike(str(work / "raw"), behaviour) as server:
        urls = work / "urls.jsonl"
        with open(urls, "w") as handle:
            for index in range(args.images):
                handle.write(json.dumps({"url": f"{server.base_url}img/{index:06d}.jpg",
                                         "caption": f"picture {index} of shapes"}) + "\n")
        for name in ("killed", "reference"):
            shutil.rmtree(work / name, ignore_errors=True)
        killed_config = write_config(work, "killed", urls, args.web)
        chunks = work / "killed" / "staging" / "chunks" / "bench"
        total_chunks = -(-args.images // 500)
        started = time.perf_counter()
        process = subprocess.Popen(command(killed_config, args.processes), cwd=ROOT, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and len(list(chunks.glob(CHUNK_FILES))) < total_chunks // 2:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        first_run = time.perf_counter() - started
        committed = len(list(chunks.glob(CHUNK_FILES)))
        hits_at_kill = sum(server.hits.values())
        started = time.perf_counter()
        resumed = subprocess.run(command(killed_config, args.processes), cwd=ROOT, capture_output=True, text=True)
        second_run = time.perf_counter() - started
        if resumed.returncode != 0:
            sys.exit(resumed.stderr[-3000:])
        total_hits = sum(server.hits.values())
        server.hits.clear()
        reference_config = write_config(work, "reference", urls, args.web)
        subprocess.run(command(reference_config, args.processes), cwd=ROOT, capture_output=True, check=True)
        reference_hits = sum(server.hits.values())

    same = checksums(work / "killed") == checksums(work / "reference")
    print(f"{args.images} URLs ({'web-like' if args.web else 'instant'} server), {args.processes} process(es)")
    print(f"killed with SIGKILL after {first_run:.1f}s: {committed} of {total_chunks} chunks committed, "
          f"{hits_at_kill} requests made")
    print(f"the same command again: finished in {second_run:.1f}s")
    print(f"requests in all: {total_hits} = {total_hits / args.images:.3f}x the URLs "
          f"(uninterrupted build: {reference_hits} = {reference_hits / args.images:.3f}x)")
    print(f"result identical to the uninterrupted build (shard and reject checksums): {same}")


if __name__ == "__main__":
    main()
