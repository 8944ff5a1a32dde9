"""Which patches and tokens each sample hides: `Masks`, drawn per sample id.

A sample's mask is a pure function of (seed, sample id, ratios), so a sample is masked the same
way whatever its position in a batch, its micro-batch or its rank: that is what makes resumed,
accumulated and elastic runs reproduce the uninterrupted run. Drawing is per sample (one
generator each) and happens where the batch is collated, in the DataLoader workers; the
training process only receives the result as two boolean tensors.

Strategies (`train.masking.strategy`):
- `independent` (M3AE): every sample masks `image_ratio` of its patches and `text_ratio` of its
  tokens;
- `cross` (MaskVLM): a paired sample masks its image and keeps its caption whole, or the other way
  round, alternating by a hash of its id; single-modality samples mask as `independent`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch


class Ratios(Protocol):
    strategy: str
    image_ratio: float
    text_ratio: float


@dataclass
class Masks:
    """What the encoder does not see, for the images and packed tokens of one batch."""

    image_masked: torch.Tensor  # [N_img, P] bool, per image row
    text_masked: torch.Tensor  # [T_tok] bool, per packed token

    @classmethod
    def nothing(cls, images: int, num_patches: int, tokens: int) -> "Masks":
        """Show the encoder every patch and token (features, alignment passes)."""
        return cls(torch.zeros(images, num_patches, dtype=torch.bool), torch.zeros(tokens, dtype=torch.bool))


def step_seed(seed: int, step: int) -> int:
    """The masking seed of one global step."""
    return seed * 1_000_003 + step


def sample_seed(seed: int, sample_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def masks_image(sample_id: str) -> bool:
    """Under `cross`, whether a paired sample masks its image (else its caption)."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=2).digest(), "little") % 2 == 0


def sample_ratios(sample_id: str, has_image: bool, length: int, masking: Ratios) -> tuple[float, float]:
    """(image, text) mask ratio of one sample under the strategy."""
    if masking.strategy == "cross" and has_image and length > 0:
        return (masking.image_ratio, 0.0) if masks_image(sample_id) else (0.0, masking.text_ratio)
    return masking.image_ratio, masking.text_ratio


def draw_masks(ids: list[str], image_index: list[int], token_lengths: list[int], num_patches: int,
               masking: Ratios, seed: int) -> Masks:
    """Per sample: a random permutation of its patches and tokens from a generator seeded by
    (seed, sample id); the first `ratio` of the patches (at least one token when the text ratio
    is positive) are masked. `image_index` and `token_lengths` are the batch's, as lists."""
    images = sum(1 for row in image_index if row >= 0)
    image_masked = torch.zeros(images, num_patches, dtype=torch.bool)
    text_masked = torch.zeros(sum(token_lengths), dtype=torch.bool)
    offset = 0
    for sample_id, row, length in zip(ids, image_index, token_lengths):
        image_ratio, text_ratio = sample_ratios(sample_id, row >= 0, length, masking)
        generator = torch.Generator().manual_seed(sample_seed(seed, sample_id))
        if row >= 0:
            order = torch.randperm(num_patches, generator=generator)
            keep = num_patches - int(round(num_patches * image_ratio))
            image_masked[row, order[keep:]] = True
        if length:
            order = torch.randperm(length, generator=generator)
            masked = min(length, max(1 if text_ratio > 0 else 0, int(round(length * text_ratio))))
            text_masked[offset + order[:masked]] = True
        offset += length
    return Masks(image_masked, text_masked)
