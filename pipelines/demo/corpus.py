"""A deterministic synthetic corpus with real cross-modal signal.

Each image shows one to three shapes of one kind and colour, of a size, at a position, on a
background; its caption says exactly that ("two large red circles at the top left on a black
background"), and `label` is the shape. Image-only and text-only sets are drawn from the same
distribution, so a model can learn from unpaired data too.

    mmae demo-data build/demo/raw --pairs 3000 --images 1000 --texts 3000
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128), "beige": (225, 210, 180)}
SIZES = {"small": 0.12, "medium": 0.2, "large": 0.3}
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "center": (0.5, 0.5),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
TEMPLATES = (
    "{count} {size} {colour} {shapes} at the {position} on a {background} background",
    "a {background} picture with {count} {size} {colour} {shapes} at the {position}",
    "{count} {colour} {shapes}, {size}, placed at the {position} of a {background} canvas",
)


def _scene(rng: random.Random) -> dict:
    return {
        "shape": rng.choice(SHAPES),
        "colour": rng.choice(list(COLOURS)),
        "background": rng.choice(list(BACKGROUNDS)),
        "size": rng.choice(list(SIZES)),
        "position": rng.choice(list(POSITIONS)),
        "count": rng.randint(1, 3),
    }


def caption_for(scene: dict, rng: random.Random) -> str:
    shapes = scene["shape"] + ("es" if scene["shape"] == "cross" else "s") if scene["count"] > 1 else scene["shape"]
    return rng.choice(TEMPLATES).format(
        count=COUNT_WORDS[scene["count"]],
        size=scene["size"],
        colour=scene["colour"],
        shapes=shapes,
        position=scene["position"],
        background=scene["background"],
    )


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    else:  # cross
        bar = radius / 3
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=fill)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=fill)


def render(scene: dict, rng: random.Random, side: int) -> Image.Image:
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    radius = SIZES[scene["size"]] * side / 2 * (1.0 if scene["count"] == 1 else 0.7)
    cx, cy = POSITIONS[scene["position"]]
    offsets = [(0.0, 0.0), (-0.12, 0.1), (0.12, 0.1)][: scene["count"]]
    for dx, dy in offsets:
        jitter = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))
        _draw_shape(
            draw,
            scene["shape"],
            (cx + dx + jitter[0]) * side,
            (cy + dy + jitter[1]) * side,
            radius,
            COLOURS[scene["colour"]],
        )
    return image


def generate(out_dir: str | Path, pairs: int = 3000, images: int = 1000, texts: int = 3000,
             side: int = 96, seed: int = 0) -> dict[str, int]:
    """Write paired.jsonl, images_only.jsonl, text_only.jsonl and images/ under out_dir."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(out / "paired.jsonl", "w", encoding="utf-8") as handle:
        for index in range(pairs):
            scene = _scene(rng)
            name = f"images/p{index:06d}.jpg"
            render(scene, rng, side).save(out / name, quality=92)
            row = {"url": name, "caption": caption_for(scene, rng), "label": scene["shape"]}
            handle.write(json.dumps(row) + "\n")
    with open(out / "images_only.jsonl", "w", encoding="utf-8") as handle:
        for index in range(images):
            scene = _scene(rng)
            name = f"images/u{index:06d}.jpg"
            render(scene, rng, side).save(out / name, quality=92)
            handle.write(json.dumps({"url": name}) + "\n")
    with open(out / "text_only.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(texts):
            handle.write(json.dumps({"text": caption_for(_scene(rng), rng)}) + "\n")
    return {"pairs": pairs, "images": images, "texts": texts}
