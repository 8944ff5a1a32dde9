"""Image and text transforms of the loader (Pillow + torch; no torchvision dependency).

Randomness comes from a `random.Random` the caller seeds per sample, so augmentations are the
same whichever worker computes them and however often a run is resumed.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image

# ImageNet statistics, as MAE and M3AE normalise.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def decode(data: bytes) -> Image.Image:
    """JPEG/WebP/PNG bytes -> RGB image (raises on truncated or corrupt data)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.2, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of torchvision's RandomResizedCrop.get_params."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback: a centre crop at the clamped ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., S, S, 3] (as decoded) -> normalised float32 [..., 3, S, S], on whatever
    device the pixels are: the loader ships uint8 (a quarter of the bytes, no per-sample
    conversion), the step normalises the whole batch at once."""
    mean, std = MEAN.to(pixels.device), STD.to(pixels.device)
    chw = pixels.movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format)
    return chw.div_(255.0).sub_(mean).div_(std)


def _pixels(image: Image.Image) -> torch.Tensor:
    """Pillow image -> HWC uint8 tensor (the one copy out of Pillow)."""
    with warnings.catch_warnings():  # read-only is fine: batches are stacked into new memory
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image))


def _open(data: bytes) -> Image.Image:
    """Header only: the size is known before any pixel is decoded."""
    return Image.open(io.BytesIO(data))


def _decode_for(image: Image.Image, box: tuple[int, int, int, int], size: int):
    """Decode, at a reduced JPEG DCT scale (1/2, 1/4, 1/8) when the crop `box` still covers
    `size` pixels at that scale: fewer pixels decoded, fewer resampled. Returns the RGB image
    and the box in its coordinates."""
    left, top, right, bottom = box
    width, height = image.size
    if image.format == "JPEG" and min(right - left, bottom - top) >= 2 * size:
        want = (math.ceil(width * size / (right - left)), math.ceil(height * size / (bottom - top)))
        image.draft("RGB", want)  # Pillow picks the largest reduction that keeps at least `want`
    image.load()
    if image.mode != "RGB":
        image = image.convert("RGB")
    scale_x, scale_y = image.width / width, image.height / height
    return image, (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)


def train_pixels(data: bytes, size: int, rng: random.Random, scale=(0.2, 1.0)) -> torch.Tensor:
    """Pretraining augmentation as uint8 [size, size, 3]: RandomResizedCrop(scale) + horizontal flip."""
    image = _open(data)
    box = random_resized_crop_box(image.width, image.height, rng, scale=scale)
    image, box = _decode_for(image, box, size)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _pixels(image)


def eval_pixels(data: bytes, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """Deterministic centre view as uint8 [size, size, 3]: shorter side to size/crop_fraction,
    centre crop to size."""
    image = decode(data)
    resize_to = int(round(size / crop_fraction))
    scale = resize_to / min(image.width, image.height)
    new_size = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return _pixels(image.crop((left, top, left + size, top + size)))


def train_view(data: bytes, size: int, rng: random.Random, scale=(0.2, 1.0)) -> torch.Tensor:
    """`train_pixels`, normalised: float32 [3, size, size]."""
    return normalise(train_pixels(data, size, rng, scale))


def eval_view(data: bytes, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """`eval_pixels`, normalised: float32 [3, size, size]."""
    return normalise(eval_pixels(data, size, crop_fraction))


def truncate_tokens(tokens: Optional[list[int]], max_tokens: int) -> list[int]:
    return list(tokens[:max_tokens]) if tokens else []
