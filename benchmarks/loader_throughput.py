"""The mmae loader (Parquet shards) vs webdataset (tar shards) on the same images, side by side.

    .venv/bin/python benchmarks/loader_throughput.py [--images 6000] [--workers 2] [--batches 120]

Both decode with Pillow and apply the identical pretraining augmentation
(`trainer.transforms.train_view`: RandomResizedCrop(0.2-1) + flip + normalise) to the same
JPEGs, and are read through a torch DataLoader with the same number of workers. webdataset
gets its usual setup (shuffle buffer, `.batched`), mmae its mixed loader with `mix: {image: 1}`.
Each side runs in a fresh process; samples/s excludes the first 10 batches (worker start-up).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fresh_process import last_line  # noqa: E402


def make_data(work: Path, count: int, side: int, shards: int) -> None:
    import webdataset as wds
    from mmae.pipelines.shards import write_shard
    from PIL import Image

    rng = random.Random(0)
    noise = Image.effect_noise((side, side), 50).convert("RGB")
    rows = []
    for index in range(count):
        tint = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        image = Image.blend(noise, tint, 0.7)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        rows.append({"id": f"{index:08d}", "source": "bench", "kind": "image", "image": buffer.getvalue(),
                     "image_format": "jpeg", "width": side, "height": side, "label": str(index % 10)})
    per_shard = count // shards
    entries = []
    (work / "wds").mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        part = rows[shard * per_shard:(shard + 1) * per_shard]
        entries.append(write_shard(str(work / "mmae"), "image", shard, shards, part, 256))
        with wds.TarWriter(str(work / "wds" / f"shard-{shard:05d}.tar")) as sink:
            for row in part:
                sink.write({"__key__": row["id"], "jpg": row["image"], "cls": row["label"].encode()})
    manifest = {"schema_version": "1", "rows": {"image": per_shard * shards}, "shards": entries, "rejects": []}
    (work / "mmae" / "manifest.json").write_text(json.dumps(manifest))


COMMON = """
import resource, sys, time, random
sys.path.insert(0, {root!r})
import torch
from mmae.trainer.transforms import train_view
def report(seconds, samples):
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(samples / seconds, own / 1024, worker / 1024)
"""

MMAE = COMMON + """
from mmae.schemas.config import TrainConfig
from mmae.trainer.loader import MixedLoader
loader = MixedLoader(TrainConfig(data={data!r}, batch_size={batch}, num_workers={workers}, image_size={size},
                                 mix={{"paired": 0, "image": 1, "text": 0}}))
samples = 0
for index, batch in enumerate(loader.batches({batches})):
    if index == 10:
        started, samples = time.perf_counter(), 0
    samples += batch.images.shape[0]
report(time.perf_counter() - started, samples)
"""

WDS = COMMON + """
import webdataset as wds
def augment(sample):
    rng = random.Random(hash(sample["__key__"]))
    return train_view(sample["jpg"], {size}, rng), int(sample["cls"])
urls = sorted(__import__("glob").glob({data!r} + "/*.tar"))
dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, empty_check=False)
           .shuffle(1024).map(augment).batched({batch}, collation_fn=lambda items: torch.stack([i[0] for i in items])))
loader = torch.utils.data.DataLoader(dataset.repeat(), batch_size=None, num_workers={workers},
                                     prefetch_factor=2 if {workers} else None)
samples = 0
for index, images in enumerate(loader):
    if index == 10:
        started, samples = time.perf_counter(), 0
    samples += images.shape[0]
    if index + 1 == {batches}:
        break
report(time.perf_counter() - started, samples)
"""


def run(code: str) -> tuple[float, float, float]:
    """(samples/s, main-process peak RSS MB, largest worker's peak RSS MB)"""
    rate, own, worker = last_line(code).split()
    return float(rate), float(own), float(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--side", type=int, default=160, help="stored JPEG side")
    parser.add_argument("--size", type=int, default=96, help="augmented crop side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; the best counts")
    parser.add_argument("--work", default=str(ROOT / "build" / "bench_loader"))
    args = parser.parse_args()
    work = Path(args.work)
    if not (work / "mmae" / "manifest.json").exists():
        make_data(work, args.images, args.side, args.shards)
    params = dict(root=str(ROOT), batch=args.batch, workers=args.workers, size=args.size, batches=args.batches)
    runs = {"mmae": [], "webdataset": []}
    for _ in range(args.repeats):  # alternate, so a disturbance hits both sides alike
        runs["mmae"].append(run(MMAE.format(data=str(work / "mmae"), **params)))
        runs["webdataset"].append(run(WDS.format(data=str(work / "wds"), **params)))
    best = {name: max(results) for name, results in runs.items()}
    print(f"{args.images} JPEGs of {args.side}px -> RandomResizedCrop {args.size}px; batch {args.batch}; "
          f"{args.workers} DataLoader workers; {args.batches} batches; best of {args.repeats}")
    print(f"\n{'loader':<18} {'samples/s':>10} {'all runs':>22} {'main RSS MB':>12} {'worker RSS MB':>14}")
    for name, label in (("mmae", "mmae (Parquet)"), ("webdataset", "webdataset (tar)")):
        rate, own, worker = best[name]
        every = "/".join(f"{result[0]:.0f}" for result in runs[name])
        print(f"{label:<18} {rate:>10.0f} {every:>22} {own:>12.0f} {worker:>14.0f}")
    print(f"\nratio mmae / webdataset: {best['mmae'][0] / best['webdataset'][0]:.2f}x samples/s")


if __name__ == "__main__":
    main()
