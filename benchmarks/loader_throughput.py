"""The mmae loader (Parquet shards) vs webdataset (tar shards) and litdata (its chunks) on the
same images, side by side, at training resolution: 224 px crops of 256 px JPEGs by default.

    .venv/bin/python benchmarks/loader_throughput.py [--images 6000] [--workers 2] [--batches 120]
    .venv/bin/pip install --no-deps litdata lightning-utilities obstore tifffile    # litdata's side
    (plain `pip install litdata` pulls torchvision, which replaces the CPU torch with a CUDA build)

Every side decodes the same JPEGs with Pillow and applies the identical augmentation
(`trainer.transforms`: RandomResizedCrop(0.2-1) + flip) through a torch DataLoader with the same
number of workers. webdataset gets its usual setup (shuffle buffer, `.batched`), litdata its
`StreamingDataset` + `StreamingDataLoader`, mmae its mixed loader with `mix: {image: 1}`.
What leaves a worker: mmae ships uint8 pixels and normalises the whole batch in the step (on the
GPU in training); the others, as their users write them, normalise each sample in the worker
(`train_view`). `--others-uint8` gives them mmae's uint8 output too, to show what that part is
worth. Each side runs in a fresh process; samples/s excludes the first 10 batches (worker start-up).
"""

from __future__ import annotations

import argparse
import io
import math
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
from mmae.trainer.transforms import train_pixels, train_view
augmentation = train_pixels if {others_uint8} else train_view
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
    return augmentation(sample["jpg"], {size}, rng), int(sample["cls"])
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


LITDATA = COMMON + """
import litdata
class Augmented(litdata.StreamingDataset):
    def __getitem__(self, index):
        sample = super().__getitem__(index)
        rng = random.Random(hash(sample["key"]))
        return augmentation(sample["jpg"], {size}, rng)
dataset = Augmented("local:" + {data!r}, shuffle=True, drop_last=True)
loader = litdata.StreamingDataLoader(dataset, batch_size={batch}, num_workers={workers},
                                     collate_fn=torch.stack, prefetch_factor=2 if {workers} else None)
samples, index = 0, 0
while index < {batches}:
    for images in loader:
        if index == 10:
            started, samples = time.perf_counter(), 0
        samples += images.shape[0]
        index += 1
        if index == {batches}:
            break
report(time.perf_counter() - started, samples)
"""


def _litdata_sample(item):
    return {"key": item[0], "jpg": item[1]}


def make_litdata(work: Path) -> None:
    """The same JPEGs in litdata's chunk format (its `optimize`)."""
    import litdata
    import pyarrow.parquet as pq

    items = []
    for path in sorted((work / "mmae" / "image").glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "image"])
        items += list(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    litdata.optimize(fn=_litdata_sample, inputs=items, output_dir=str(work / "litdata"), chunk_bytes="32MB",
                     num_workers=1, mode="overwrite")


def run(code: str) -> tuple[float, float, float]:
    """(samples/s, main-process peak RSS MB, largest worker's peak RSS MB)"""
    rate, own, worker = last_line(code).split()
    return float(rate), float(own), float(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--side", type=int, default=256, help="stored JPEG side")
    parser.add_argument("--size", type=int, default=224, help="augmented crop side")
    parser.add_argument("--others-uint8", action="store_true", help="webdataset and litdata ship uint8 too")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; the best counts")
    parser.add_argument("--work", default=None, help="data folder (default build/bench_loader_SIDE)")
    args = parser.parse_args()
    work = Path(args.work or ROOT / "build" / f"bench_loader_{args.side}")
    if not (work / "mmae" / "manifest.json").exists():
        make_data(work, args.images, args.side, args.shards)
    try:
        import litdata  # noqa: F401
        sides = ["mmae", "webdataset", "litdata"]
        if not (work / "litdata" / "index.json").exists():
            make_litdata(work)
    except ImportError:
        print("litdata is not installed: its side is left out (see the docstring)")
        sides = ["mmae", "webdataset"]
    params = dict(root=str(ROOT), batch=args.batch, workers=args.workers, size=args.size, batches=args.batches,
                  others_uint8=args.others_uint8)
    code = {"mmae": (MMAE, "mmae"), "webdataset": (WDS, "wds"), "litdata": (LITDATA, "litdata")}
    runs = {side: [] for side in sides}
    for _ in range(args.repeats):  # alternate, so a disturbance hits every side alike
        for side in sides:
            template, folder = code[side]
            runs[side].append(run(template.format(data=str(work / folder), **params)))
    best = {name: max(results) for name, results in runs.items()}
    print(f"{args.images} JPEGs of {args.side}px -> RandomResizedCrop {args.size}px; batch {args.batch}; "
          f"{args.workers} DataLoader workers; {args.batches} batches; best of {args.repeats}; others ship "
          f"{'uint8' if args.others_uint8 else 'normalised float'}")
    print(f"\n{'loader':<18} {'samples/s':>10} {'per worker':>11} {'all runs':>22} {'main RSS MB':>12} "
          f"{'worker RSS MB':>14}")
    labels = {"mmae": "mmae (Parquet)", "webdataset": "webdataset (tar)", "litdata": "litdata (chunks)"}
    for name in sides:
        rate, own, worker = best[name]
        every = "/".join(f"{result[0]:.0f}" for result in runs[name])
        print(f"{labels[name]:<18} {rate:>10.0f} {rate / max(1, args.workers):>11.0f} {every:>22} {own:>12.0f} "
              f"{worker:>14.0f}")
    for other in sides[1:]:
        print(f"ratio mmae / {other}: {best['mmae'][0] / best[other][0]:.2f}x samples/s")
    per_worker = best["mmae"][0] / max(1, args.workers)
    print(f"worker processes to feed one GPU at 2,000 samples/s: {math.ceil(2000 / per_worker)} "
          f"(mmae, {per_worker:.0f} samples/s per worker on this machine)")


if __name__ == "__main__":
    main()
