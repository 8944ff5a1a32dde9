"""Near-duplicate texts (`data.quality.near_duplicate_texts`): MinHash over word 3-grams, with
LSH banding, so that finding them costs what exact dedup costs.

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
import re

import numpy as np

PERMUTATIONS = 128
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


def signature(text: str) -> np.ndarray:
    """[PERMUTATIONS] uint64 MinHash of the text's word 3-grams."""
    hashes = np.fromiter((int.from_bytes(hashlib.blake2b(item.encode("utf-8", "surrogatepass"),
                                                         digest_size=4).digest(), "little")
                          for item in shingles(text)), dtype=np.uint64) % np.uint64(_PRIME)
    a, b = _permutations()
    return ((a[:, None] * hashes[None, :] + b[:, None]) % _PRIME).min(axis=1)


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
    bands, rows = bands_for(threshold)
    values = signature(text)
    return [hashlib.blake2b(f"near:{kind}:{band}:".encode() + values[band * rows:(band + 1) * rows].tobytes(),
                            digest_size=16).digest() for band in range(bands)]


def reason_of(detail: str) -> str:
    """The reject reason of a dedup detail: near_duplicate for band matches, else duplicate."""
    return "near_duplicate" if detail.startswith(NEAR) else "duplicate"
