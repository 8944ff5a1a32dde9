"""Near-duplicates, found with LSH banding so that finding them costs what exact dedup costs.

Texts (`data.quality.near_duplicate_texts`): MinHash over word 3-grams. Images
(`data.quality.near_duplicate_images`): a perceptual hash and the Hamming distance, below.

A text's signature is the minimum of `PERMUTATIONS` universal hashes over its word 3-gram set
(the standard MinHash; two signatures agree in a position with probability = the sets' Jaccard
similarity). The signature is cut into `bands` bands of `rows` positions; each band is one
16-byte key, packed and grouped exactly like an exact-dedup hash (`dedup.FindDuplicates`): a
text that shares any band with an earlier text of the same kind is a `near_duplicate` of it
(the first in input order wins, as for exact duplicates). Bands and rows are chosen for the
threshold as datasketch's `MinHashLSH` chooses them (least false positives + false negatives
under the S-curve 1 - (1 - s^rows)^bands), so a pair at similarity s is found with that
probability; no pair is compared one by one, and nothing but the packed band keys (30 bytes
each) crosses the shuffle.

Written with numpy rather than datasketch: its `MinHash` costs a Python call per shingle and
pulls in scipy; the hashing here is a few array operations per text.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

PERMUTATIONS = 128
SHINGLE_BATCH = 1 << 14  # shingles permuted at once: [PERMUTATIONS, SHINGLE_BATCH] uint64 is 16 MB
_PRIME = (1 << 31) - 1  # h -> (a h + b) mod p, a, b, h < p: products stay below 2^62
_WORD = re.compile(r"\w+", re.UNICODE)
NEAR = "near-duplicate"  # the detail's first word, which makes the reject reason near_duplicate


@functools.lru_cache(maxsize=1)
def _permutations() -> tuple[np.ndarray, np.ndarray]:
    draw = np.random.default_rng(1)  # fixed: the same signature on every machine and every build
    return (draw.integers(1, _PRIME, PERMUTATIONS, dtype=np.uint64),
            draw.integers(0, _PRIME, PERMUTATIONS, dtype=np.uint64))


def shingles(text: str, size: int = 3) -> set[str]:
    """Lower-case word `size`-grams (the whole text when it is shorter)."""
    words = _WORD.findall(text.lower())
    if not words:  # only symbols or emoji: the text itself, so unlike texts never collide
        return {"\x00" + text}
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[start:start + size]) for start in range(len(words) - size + 1)}


def _shingle_hashes(text: str) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(item.encode("utf-8", "surrogatepass"), digest_size=4).digest(),
                                       "little") for item in shingles(text)), dtype=np.uint64) % np.uint64(_PRIME)


def signature(text: str) -> np.ndarray:
    """[PERMUTATIONS] uint64 MinHash of the text's word 3-grams."""
    return signatures([text])[0]


def signatures(texts: list[str]) -> np.ndarray:
    """[len(texts), PERMUTATIONS] MinHash signatures: the permutations of every shingle of a
    batch in one array operation, at most `SHINGLE_BATCH` shingles at a time (a long document's
    shingles over several), and each text's minimum by one `reduceat`."""
    a, b = _permutations()
    result = np.full((len(texts), PERMUTATIONS), _PRIME, dtype=np.uint64)
    per_text = [_shingle_hashes(text) for text in texts]
    if not per_text:
        return result
    hashes = np.concatenate(per_text)
    owner = np.repeat(np.arange(len(texts)), [len(item) for item in per_text])
    for start in range(0, len(hashes), SHINGLE_BATCH):
        block, rows = hashes[start:start + SHINGLE_BATCH], owner[start:start + SHINGLE_BATCH]
        firsts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # each text's first shingle in the block
        permuted = (a[:, None] * block[None, :] + b[:, None]) % _PRIME
        minima = np.minimum.reduceat(permuted, firsts, axis=1).T
        result[rows[firsts]] = np.minimum(result[rows[firsts]], minima)
    return result


@functools.lru_cache(maxsize=16)
def bands_for(threshold: float, permutations: int = PERMUTATIONS) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= permutations that minimise the false-positive area
    below `threshold` plus the false-negative area above it (equal weights)."""
    similarity = np.linspace(0.0, 1.0, 1001)
    best, chosen = float("inf"), (1, permutations)
    for bands in range(1, permutations + 1):
        for rows in range(1, permutations // bands + 1):
            found = 1 - (1 - similarity ** rows) ** bands
            below, above = similarity <= threshold, similarity >= threshold
            error = np.trapezoid(found[below], similarity[below]) + np.trapezoid(1 - found[above], similarity[above])
            if error < best:
                best, chosen = error, (bands, rows)
    return chosen


def found_probability(similarity: float, threshold: float) -> float:
    """The chance that a pair at this Jaccard similarity shares a band (is found)."""
    bands, rows = bands_for(threshold)
    return 1 - (1 - similarity ** rows) ** bands


def band_keys(text: str, kind: str, threshold: float) -> list[bytes]:
    """One 16-byte key per band; texts of the same kind that share a key are near-duplicates."""
    high, low, _ = text_band_keys([text], kind, threshold)
    return [int(first).to_bytes(8, "big") + int(second).to_bytes(8, "big") for first, second in zip(high, low)]


def text_band_keys(texts: list[str], kind: str, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`band_keys` of many texts at once, as arrays (key's first 8 bytes, last 8 bytes, which
    text): each band's values folded by splitmix64 from two seeds of (kind, band)."""
    bands, rows = bands_for(threshold)
    values = signatures(texts)[:, :bands * rows].reshape(len(texts), bands, rows)
    high, low = _band_seeds(kind, bands)
    high, low = np.broadcast_to(high, (len(texts), bands)), np.broadcast_to(low, (len(texts), bands))
    for position in range(rows):
        high, low = _mix(high ^ values[:, :, position]), _mix(low ^ values[:, :, position])
    return high.ravel(), low.ravel(), np.repeat(np.arange(len(texts)), bands)


@functools.lru_cache(maxsize=64)
def _band_seeds(kind: str, bands: int) -> tuple[np.ndarray, np.ndarray]:
    seeds = [hashlib.blake2b(f"near:{kind}:{band}:".encode(), digest_size=16).digest() for band in range(bands)]
    return (np.array([int.from_bytes(seed[:8], "big") for seed in seeds], dtype=np.uint64),
            np.array([int.from_bytes(seed[8:], "big") for seed in seeds], dtype=np.uint64))


def reason_of(detail: str) -> str:
    """The reject reason of a dedup detail: near_duplicate for band matches, else duplicate."""
    return "near_duplicate" if detail.startswith(NEAR) else "duplicate"


# --- Near-duplicate images (`data.quality.near_duplicate_images`) ---------------------------------
#
# A 64-bit DCT perceptual hash (pHash: the grey image at 32 x 32, its 8 x 8 lowest frequencies,
# each bit = coefficient above their median) of the pixels as stored, so a copy re-encoded at
# another quality or resized to another size is hashed from the same pixels. Written with numpy
# (two 8 x 32 matrix products) rather than imagehash, which needs scipy and PyWavelets for the
# same transform and could not give the mirrored hash from the same coefficients.
#
# Each image has IMAGE_VARIANTS hashes: the whole image and centre crops of CROPS of each side,
# each also mirrored (a horizontal flip negates the odd horizontal frequencies). A copy cropped
# by up to ~5% a side is then close to one of them. Every hash is cut into IMAGE_BANDS bands of
# 16 bits; each band is one 16-byte key, (8-byte hash of the band, 8-byte hash itself), so the
# rows that share a band are grouped by the same packing as exact dedup, and within a group
# the hashes themselves are compared: a row within `near_duplicate_images` bits of an earlier
# row of the same kind (and caption, for paired rows) is near_duplicate. Two hashes within 3
# bits always share a band; within 8, they almost always do (docs/BENCHMARKS.md).

THUMBNAIL = 32
GREY = 64  # the grey thumbnail's side: two pixels per cell of the 32 x 32 the DCT sees
CROPS = (0.0, 0.025, 0.05)
IMAGE_VARIANTS = 2 * len(CROPS)
IMAGE_BANDS = 4
FLAT_STD = 2.0  # grey levels: a flat image (one colour, a faint gradient) has no hash worth comparing
IMAGE_NEAR = "near-duplicate image"  # Packed.what of image band keys
_MIRROR = np.where(np.arange(8) % 2 == 1, -1.0, 1.0)[None, :]


@functools.lru_cache(maxsize=1)
def _dct() -> np.ndarray:
    """The 8 lowest rows of the 32-point DCT-II matrix."""
    return np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(THUMBNAIL)[None, :] + 1) / (2 * THUMBNAIL))


@functools.lru_cache(maxsize=1)
def _area_matrices() -> tuple[np.ndarray, np.ndarray]:
    """On a GREY x GREY thumbnail: [THUMBNAIL, GREY], the mean over each of THUMBNAIL equal cells
    (a box resize), and [len(CROPS), 8, GREY], the DCT of that resize for each centre crop of
    CROPS, so that every hash of a batch of images is a few batched matrix products."""
    pixels = np.arange(GREY)
    resizes = []
    for crop in CROPS:
        edges = np.linspace(GREY * crop, GREY * (1 - crop), THUMBNAIL + 1)
        overlap = np.clip(np.minimum(edges[1:, None], pixels[None, :] + 1) - np.maximum(edges[:-1, None], pixels[None, :]), 0, None)
        resizes.append(overlap / overlap.sum(axis=1, keepdims=True))
    return resizes[0].astype(np.float32), np.stack([_dct() @ resize for resize in resizes]).astype(np.float32)


def grey_thumbnail(image: "np.ndarray | Image.Image") -> bytes:
    """The GREY x GREY grey thumbnail the hashes are made from (Pillow's C code, which does
    not hold the GIL while it works: this runs in the download threads)."""
    from PIL import Image

    picture = Image.fromarray(image, "RGB") if isinstance(image, np.ndarray) else image
    return picture.convert("L").resize((GREY, GREY), Image.Resampling.BOX).tobytes()


def stored_thumbnail(data: bytes, image: "np.ndarray | Image.Image | None" = None) -> bytes:
    """`grey_thumbnail` of a stored image, from its bytes. A JPEG's luma is decoded by libjpeg
    alone, at the smallest DCT scale that still covers GREY x GREY (a 256 px image at 1/4): no
    colour conversion, no GIL (0.12 ms for 256 px against Pillow's 0.17 ms, most of which holds
    the GIL the network threads need). Other formats: from `image`, their pixels, or decoded."""
    import simplejpeg
    from PIL import Image

    if data[:3] == b"\xff\xd8\xff":
        try:
            luma = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_width=GREY, min_height=GREY)[:, :, 0]
        except ValueError:
            luma = None
        if luma is not None:
            if luma.shape == (GREY, GREY):
                return luma.tobytes()
            grey = Image.fromarray(np.ascontiguousarray(luma), "L")
            return grey.resize((GREY, GREY), Image.Resampling.BOX).tobytes()
    if image is None:
        with Image.open(io.BytesIO(data)) as opened:
            return grey_thumbnail(opened.convert("RGB"))
    return grey_thumbnail(image)


def hashes_of_thumbnails(thumbnails: list[bytes]) -> list[Optional[list[int]]]:
    """`image_hashes` of many images at once, from their `grey_thumbnail`s: one pass of numpy
    over the batch instead of a dozen small calls per image."""
    if not thumbnails:
        return []
    pixels = np.frombuffer(b"".join(thumbnails), np.uint8).reshape(len(thumbnails), GREY, GREY).astype(np.float32)
    resize, crops = _area_matrices()
    flat = (resize @ pixels @ resize.T).std(axis=(1, 2)) < FLAT_STD
    rows = np.matmul(crops.reshape(-1, GREY), pixels).reshape(len(thumbnails), len(CROPS), 8, GREY)
    coefficients = np.matmul(rows, crops.transpose(0, 2, 1)[None])  # [image, crop, vertical, horizontal frequency]
    variants = np.stack([coefficients, coefficients * _MIRROR], axis=2).reshape(len(thumbnails), IMAGE_VARIANTS, 64)
    bits = variants > np.median(variants, axis=2, keepdims=True)
    values = np.packbits(bits, axis=2).view(">u8")[..., 0]
    return [None if flat[row] else [int(value) for value in values[row]] for row in range(len(thumbnails))]


def image_hashes(image: "np.ndarray | Image.Image") -> list[int] | None:
    """The IMAGE_VARIANTS 64-bit hashes of an RGB image (pixels or a Pillow image), in the order
    (whole, whole mirrored, crop 2.5%, mirrored, crop 5%, mirrored); None for a flat image."""
    return hashes_of_thumbnails([grey_thumbnail(image)])[0]


def image_band_keys(hashes: list[int], kind: str, caption: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    """One key per (variant, band), without repeats, as (first 8 bytes, last 8 bytes) uint64
    arrays: a hash of (kind, caption for paired rows, band, the band's 16 bits), and the pHash."""
    high, low, _ = images_band_keys([hashes], [image_group(kind, caption)])
    return high, low


def image_group(kind: str, caption: Optional[str]) -> str:
    """What images must share to be compared: the kind, and for paired rows the caption."""
    return f"near-image:{kind}:{caption if kind == 'paired' and caption is not None else ''}"


def images_band_keys(hashes: list[list[int]], groups: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`image_band_keys` of many images (their IMAGE_VARIANTS hashes and `image_group`s) at
    once: (first halves, second halves, which image), a variant equal to another of the same
    image counted once."""
    if not hashes:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty, np.zeros(0, dtype=np.intp)
    seeds = np.array([int.from_bytes(hashlib.blake2b(group.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                     "big") for group in groups], dtype=np.uint64)
    values = np.sort(np.array(hashes, dtype=np.uint64), axis=1)  # [image, variant]: repeats side by side
    first = np.ones(values.shape, dtype=bool)
    first[:, 1:] = values[:, 1:] != values[:, :-1]
    bands = np.arange(IMAGE_BANDS, dtype=np.uint64)
    bits = (values[:, :, None] >> (np.uint64(16) * bands)) & np.uint64(0xFFFF)  # [image, variant, band]
    high = _mix(seeds[:, None, None] ^ (bands << np.uint64(16) | bits))
    low = np.broadcast_to(values[:, :, None], high.shape)
    keep = np.broadcast_to(first[:, :, None], high.shape)
    owner = np.broadcast_to(np.arange(len(hashes))[:, None, None], high.shape)
    return high[keep], low[keep], owner[keep]


def _mix(value: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit value, vectorised."""
    with np.errstate(over="ignore"):
        value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return value ^ (value >> np.uint64(31))
