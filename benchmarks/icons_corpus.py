"""A real third-party image/caption corpus made from a registry package: Material Design Icons.

    .venv/bin/python benchmarks/icons_corpus.py [--out build/icons] [--package PATH.tgz] [--size 64]

`@mdi/svg` (npm; package.json: Apache-2.0, LICENSE: the Pictogrammers Free License, icons under
Apache 2.0; version pinned below) ships ~7,400 icons drawn by its community,
each an SVG path with a name (`weather-lightning-rainy`), aliases and category tags
(`Weather`). Each icon becomes one row:

- image: the path rendered with matplotlib (svgpath2mpl parses the path) at `--size` px, in a
  colour, on a background, at a scale and offset drawn from the icon's name, so neither colour
  nor position says anything about the category;
- caption: the name's words and its aliases ("weather lightning rainy, thunderstorm");
- label: the icon's category when it has exactly one tag and that tag is one of the categories
  with at least `--min-class` such icons (25 categories at 50); other icons have no label.

Split, by a hash of the icon's name: 20% held out (never trained on: the probe's test images and
the retrieval pairs), the rest pretraining, itself split into paired (60%), image-only (20%,
caption dropped) and text-only (20%, image dropped) rows. The script writes the raw corpus
(PNG files and JSONL lists, with paths relative to the lists) and two build configs:

    mmae build --config build/icons/pretrain.yaml   # the corpus a run trains on
    mmae build --config build/icons/heldout.yaml    # the held-out icons, with the first's tokenizer

`CORPUS.json` records the package's name, version, licence and sha256, and the counts.
The package comes from the npm registry (`npm pack`) unless `--package` names a tarball.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

PACKAGE = "@mdi/svg"
VERSION = "7.4.47"
ROOT = Path(__file__).resolve().parent.parent


def bucket(name: str, salt: str) -> float:
    """A number in [0, 1) fixed by the name (and the purpose), the same on every machine."""
    digest = hashlib.blake2b(f"{salt}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64


def fetch_package(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"mdi-svg-{VERSION}.tgz"
    if not tarball.exists():
        print(f"npm pack {PACKAGE}@{VERSION} ...", file=sys.stderr)
        subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
    return tarball


def read_package(tarball: Path) -> tuple[dict, list[dict], dict[str, str]]:
    """package.json, meta.json and every icon's path data, read straight from the tarball."""
    paths: dict[str, str] = {}
    with tarfile.open(tarball) as archive:
        package = json.load(archive.extractfile("package/package.json"))
        try:  # the icons' own licence (the package.json field names the package's)
            licence = archive.extractfile("package/LICENSE").read().decode().strip().splitlines()[0]
            package["license_file"] = licence
        except (KeyError, AttributeError, IndexError):
            pass
        meta = json.load(archive.extractfile("package/meta.json"))
        for member in archive:
            if member.isfile() and member.name.startswith("package/svg/") and member.name.endswith(".svg"):
                svg = archive.extractfile(member).read().decode()
                found = re.search(r'\sd="([^"]+)"', svg)
                if found:
                    paths[member.name[len("package/svg/"):-4]] = found.group(1)
    return package, meta, paths


def caption_of(icon: dict, aliases: bool = True) -> str:
    words = icon["name"].replace("-", " ")
    if not aliases:
        return words
    return ", ".join([words, *(alias.replace("-", " ") for alias in icon.get("aliases", [])[:3])])


class Renderer:
    """One matplotlib figure reused for every icon (about 20 ms each)."""

    def __init__(self, size: int):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.size = size
        self.figure = plt.figure(figsize=(1, 1), dpi=size)
        self.axes = self.figure.add_axes((0, 0, 1, 1))

    def png(self, name: str, path_data: str) -> bytes:
        from matplotlib.patches import PathPatch
        from matplotlib.transforms import Affine2D
        from svgpath2mpl import parse_path

        draw = random.Random(f"look:{name}")
        hue = draw.random()
        foreground = colorsys.hsv_to_rgb(hue, draw.uniform(0.5, 1.0), draw.uniform(0.3, 0.8))
        background = colorsys.hsv_to_rgb((hue + draw.uniform(0.25, 0.75)) % 1.0, draw.uniform(0.0, 0.3),
                                         draw.uniform(0.85, 1.0))
        scale = draw.uniform(0.7, 1.0)
        dx, dy = (draw.uniform(0, 24 * (1 - scale)) for _ in range(2))
        path = parse_path(path_data).transformed(Affine2D().scale(scale).translate(dx, dy))
        self.axes.clear()
        self.axes.set_axis_off()
        self.axes.set_xlim(0, 24)
        self.axes.set_ylim(24, 0)
        self.figure.patch.set_facecolor(background)
        self.axes.add_patch(PathPatch(path, facecolor=foreground, edgecolor="none"))
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=self.size, facecolor=background)
        return buffer.getvalue()


def role_of(name: str) -> str:
    if bucket(name, "heldout") < 0.2:
        return "heldout"
    share = bucket(name, "kind")
    return "paired" if share < 0.6 else "image" if share < 0.8 else "text"


def build_config(out: Path, name: str, sources: list[dict], tokenizer: str | None) -> str:
    import yaml

    config = {"data": {
        "output": str(out / "shards" / name),
        "sources": sources,
        "image": {"size": 64, "resize_mode": "center_crop", "min_size": 16, "format": "png"},
        "text": {"min_words": 1, "max_tokens": 32},
        "tokenizer": {"model": tokenizer, "vocab_size": 2000},
        "shards": {"rows_per_shard": 5000},
    }}
    return yaml.safe_dump(config, sort_keys=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "build" / "icons"))
    parser.add_argument("--package", help=f"a {PACKAGE} tarball (default: npm pack {PACKAGE}@{VERSION})")
    parser.add_argument("--size", type=int, default=64, help="rendered side in pixels (default 64)")
    parser.add_argument("--min-class", type=int, default=50, help="icons a category needs to be a label")
    parser.add_argument("--captions", choices=("aliases", "name"), default="aliases",
                        help="the name's words and up to 3 aliases (default), or the name's words only")
    args = parser.parse_args()
    out = Path(args.out)
    tarball = Path(args.package) if args.package else fetch_package(out / "package")
    package, meta, paths = read_package(tarball)
    icons = [icon for icon in meta if not icon.get("deprecated") and icon["name"] in paths]
    single = Counter(icon["tags"][0] for icon in icons if len(icon["tags"]) == 1)
    classes = sorted(tag for tag, count in single.items() if count >= args.min_class)
    raw = out / "raw"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    renderer = Renderer(args.size)
    lists: dict[str, list[dict]] = {"paired": [], "image": [], "text": [], "heldout": []}
    started = time.perf_counter()
    for number, icon in enumerate(sorted(icons, key=lambda icon: icon["name"])):
        name = icon["name"]
        label = icon["tags"][0] if len(icon["tags"]) == 1 and icon["tags"][0] in classes else None
        role = role_of(name)
        row = {"name": name, "label": label}
        if role != "text":
            image = raw / "images" / f"{name}.png"
            if not image.exists():
                image.write_bytes(renderer.png(name, paths[name]))
            row["url"] = f"images/{name}.png"
        if role != "image":
            row["caption" if role != "text" else "text"] = caption_of(icon, args.captions == "aliases")
        lists[role].append(row)
        if number % 1000 == 999:
            print(f"  {number + 1:,} / {len(icons):,} icons ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for role, rows in lists.items():
        with open(raw / f"{role}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)

    common = {"label_column": "label", "id_from": "column", "id_column": "name"}
    pretrain = [
        {"name": "icons", "kind": "paired", "path": str(raw / "paired.jsonl"), **common},
        {"name": "icons-images", "kind": "image", "path": str(raw / "image.jsonl"), **common},
        {"name": "icons-texts", "kind": "text", "path": str(raw / "text.jsonl"), **common},
    ]
    heldout = [{"name": "icons-heldout", "kind": "paired", "path": str(raw / "heldout.jsonl"), **common}]
    (out / "pretrain.yaml").write_text(build_config(out, "pretrain", pretrain, None))
    (out / "heldout.yaml").write_text(build_config(out, "heldout", heldout, str(out / "shards" / "pretrain")))
    labelled = {role: sum(1 for row in rows if row["label"]) for role, rows in lists.items()}
    record = {
        "package": PACKAGE, "version": package.get("version"), "license": package.get("license"),
        "license_file": package.get("license_file"),
        "homepage": package.get("homepage"), "sha256": hashlib.sha256(tarball.read_bytes()).hexdigest(),
        "icons": len(icons), "image_size": args.size, "classes": classes,
        "rows": {role: len(rows) for role, rows in lists.items()}, "labelled": labelled,
        "renderer": "matplotlib + svgpath2mpl", "captions": args.captions,
    }
    (out / "CORPUS.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{PACKAGE} {record['version']} ({record['license']}): {len(icons):,} icons, {len(classes)} categories; "
          f"rows {record['rows']}, labelled {labelled}; wrote {out}/pretrain.yaml and {out}/heldout.yaml")


if __name__ == "__main__":
    main()
