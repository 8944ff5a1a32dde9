"""Precision and recall of `data.quality.near_duplicate_images` on copies of pictures.

    .venv/bin/python benchmarks/near_duplicate_images.py [--distance 8] [--count 1000] [--size 64]

The originals are `--count` generated pictures (a gradient sky, 3-25 shapes, blur and sensor
noise; 480 x 360 JPEG at quality 92), all different. For each original, the copies a CDN, a
re-poster or a scraper makes:
  jpeg_q30..q70   re-encoded at a random lower quality
  resized         scaled to 40-70% or 150% (then re-encoded)
  cropped         up to 5% cut from each side, independently
  mirrored        flipped left-right
  mirrored_jpeg   flipped and re-encoded at quality 50
  watermark       a white strip over the bottom 8% (reported, not part of the target: pHash
                  sees a changed image)
Every image goes through `process_image` as a build stores it (`--size`, centre crop), so the
hashes are of the stored pixels, and through the same band keys and grouping as a build
(`dedup.later_copies`). Recall = the share of copies rejected as a near-duplicate of their own
original; false positives = the share of originals rejected when only the originals are built.
Nothing here is a test split: the default distance was not chosen on it.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmae.pipelines.builder import neardup  # noqa: E402
from mmae.pipelines.builder.dedup import HashPacker, later_copies  # noqa: E402
from mmae.pipelines.builder.images import process_image  # noqa: E402
from mmae.pipelines.builder.records import ChunkKey, Packed  # noqa: E402
from mmae.schemas.config import ImageConfig  # noqa: E402

TARGET = ("jpeg", "resized", "cropped", "mirrored", "mirrored_jpeg")


def picture(seed: int, width: int = 480, height: int = 360) -> Image.Image:
    draw = random.Random(seed)
    top, bottom = (np.array([draw.randrange(256) for _ in range(3)]) for _ in range(2))
    ramp = np.linspace(0, 1, height)[:, None, None]
    image = Image.fromarray((top * (1 - ramp) + bottom * ramp).repeat(width, axis=1).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for _ in range(draw.randint(3, 25)):
        x, y = draw.randrange(-100, width), draw.randrange(-100, height)
        box = [x, y, x + draw.randrange(20, 300), y + draw.randrange(20, 300)]
        colour = tuple(draw.randrange(256) for _ in range(3))
        shape = draw.random()
        if shape < 0.4:
            pen.ellipse(box, fill=colour)
        elif shape < 0.8:
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(draw.randrange(width), draw.randrange(height)) for _ in range(draw.randint(3, 6))], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(draw.uniform(0, 2)))
    noise = np.random.default_rng(seed).normal(0, draw.uniform(2, 12), (height, width, 3))
    return Image.fromarray((np.asarray(image) + noise).clip(0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def copies(image: Image.Image, draw: random.Random) -> dict[str, bytes]:
    width, height = image.size
    scale = draw.choice([draw.uniform(0.4, 0.7), 1.5])
    cut = [int(side * draw.uniform(0, 0.05)) for side in (width, height, width, height)]
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    marked = image.copy()
    ImageDraw.Draw(marked).rectangle([0, int(height * 0.92), width, height], fill=(255, 255, 255))
    return {
        "jpeg": jpeg(decoded(jpeg(image, 92)), draw.randrange(30, 71)),
        "resized": jpeg(image.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC), 85),
        "cropped": jpeg(image.crop((cut[0], cut[1], width - cut[2], height - cut[3])), 90),
        "mirrored": jpeg(mirrored, 92),
        "mirrored_jpeg": jpeg(mirrored, 50),
        "watermark": jpeg(marked, 90),
    }


def stored_images(dataset: str, count: int) -> list[Image.Image]:
    import pyarrow.parquet as pq

    found: list[Image.Image] = []
    for path in sorted(Path(dataset).glob("[pi][am]*/part-*.parquet")):  # paired/ and image/
        for data in pq.read_table(path, columns=["image"]).column("image").to_pylist():
            found.append(decoded(data))
            if len(found) == count:
                return found
    return found


def rejected(hashes: list[list[int] | None], distance: int) -> dict[int, str]:
    """Row -> detail for the rows the build would reject, in this input order (one chunk)."""
    packer = HashPacker(1)
    ids = [f"{number:020x}" for number in range(len(hashes))]
    for number, found in enumerate(hashes):
        if found is not None:
            packer.add_keys(*neardup.image_band_keys(found, "image", None), number, ids[number])
    packs = [Packed(ChunkKey(0, 0, 0), neardup.IMAGE_NEAR, packed) for _, packed in packer.items()]
    return {index: detail for _, found in later_copies((0, packs), distance) for index, detail in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distance", type=int, default=8, help="data.quality.near_duplicate_images")
    parser.add_argument("--count", type=int, default=1000, help="originals")
    parser.add_argument("--size", type=int, default=64, help="data.image.size the build stores at")
    parser.add_argument("--originals", metavar="DATASET", help="take the first --count stored images of a built "
                        "dataset as the originals instead (e.g. build/icons/pretrain; they must all differ)")
    args = parser.parse_args()
    config = ImageConfig(size=args.size, min_size=8)
    draw = random.Random(0)
    started = time.perf_counter()
    pictures = stored_images(args.originals, args.count) if args.originals else map(picture, range(args.count))
    originals, made = [], []
    for image in pictures:
        originals.append(jpeg(image, 92))
        made.append(copies(image, draw))
    if not originals:
        sys.exit(f"no stored images in {args.originals}/paired or /image")
    args.count = len(originals)
    print(f"{args.count} originals, {args.count * 6} copies made in {time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    original_hashes = [process_image(data, config, hashes=True).phashes for data in originals]
    per_image_ms = (time.perf_counter() - started) / len(originals) * 1000
    hashing = {name: [process_image(copy[name], config, hashes=True).phashes for copy in made]
               for name in made[0]}
    flat = sum(found is None for found in original_hashes)

    wrong = rejected(original_hashes, args.distance)
    print(f"\nstored at {args.size} px, distance <= {args.distance} of 64 bits; {flat} originals too flat to hash")
    print(f"{'copy':<16}{'found':>8}{'of':>7}{'recall':>9}")
    found_all = total_all = 0
    for name, hashes in hashing.items():
        # Originals first, then this kind of copy: a copy is found when it is rejected naming its own original.
        result = rejected(original_hashes + hashes, args.distance)
        ids = {f"{number:020x}": number for number in range(args.count)}
        found = sum(1 for number in range(args.count)
                    if (detail := result.get(args.count + number)) and ids.get(detail.split()[2]) == number)
        if name in TARGET:
            found_all, total_all = found_all + found, total_all + args.count
        print(f"{name:<16}{found:>8}{args.count:>7}{found / args.count:>9.1%}")
    print(f"{'all but watermark':<16}{found_all:>8}{total_all:>7}{found_all / total_all:>9.1%}")
    print(f"\nfalse positives: {len(wrong)} of {args.count} different originals rejected ({len(wrong) / args.count:.2%})")
    print(f"hashing: {per_image_ms:.2f} ms per image (decode + store + 6 hashes), "
          f"{len(neardup.image_band_keys(original_hashes[0] or [0] * 6, 'image', None)[0])} band keys of 30 bytes")


if __name__ == "__main__":
    main()
