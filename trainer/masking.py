"""Which patches and tokens each sample hides: named plans, drawn per sample id.

A plan is a pure function of (seed, sample id, ratios), so a sample is masked the same way
whatever its position in a batch, its micro-batch or its rank: that is what makes resumed,
accumulated and elastic runs reproduce the uninterrupted run.

Strategies (`train.masking.strategy`):
- `independent` (M3AE): every sample masks `image_ratio` of its patches and `text_ratio` of its
  tokens;
- `cross` (MaskVLM): a paired sample masks its image and keeps its caption whole, or the other way
  round, alternating by a hash of its id; single-modality samples mask as `independent`.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Protocol

import torch
from mmae.trainer.batch import Inputs

EMPTY = torch.empty(0, dtype=torch.long)


class Ratios(Protocol):
    strategy: str
    image_ratio: float
    text_ratio: float


class MaskPlan(NamedTuple):
    """One sample's plan: sorted indices of its patches and tokens the encoder sees or not."""

    image_keep: torch.Tensor
    image_masked: torch.Tensor
    text_keep: torch.Tensor
    text_masked: torch.Tensor


def step_seed(seed: int, step: int) -> int:
    """The masking seed of one global step."""
    return seed * 1_000_003 + step


def sample_seed(seed: int, sample_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def per_sample_ratios(inputs: Inputs, masking: Ratios) -> tuple[list[float], list[float]]:
    """(image, text) mask ratio of every sample under the strategy."""
    image_ratios, text_ratios = [], []
    for index, sample_id in enumerate(inputs.ids):
        paired = inputs.has_image(index) and int(inputs.token_lengths[index]) > 0
        if masking.strategy == "cross" and paired:
            mask_image = int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=2).digest(), "little") % 2 == 0
            image_ratios.append(masking.image_ratio if mask_image else 0.0)
            text_ratios.append(0.0 if mask_image else masking.text_ratio)
        else:
            image_ratios.append(masking.image_ratio)
            text_ratios.append(masking.text_ratio)
    return image_ratios, text_ratios


def plan_masks(inputs: Inputs, num_patches: int, masking: Ratios, seed: int) -> list[MaskPlan]:
    """Per sample: a random permutation of its patches and tokens from a generator seeded by
    (seed, sample id); the first `ratio` of the patches (at least one token when the text ratio
    is positive) are masked."""
    image_ratios, text_ratios = per_sample_ratios(inputs, masking)
    lengths = inputs.token_lengths.tolist()
    plans = []
    for index, sample_id in enumerate(inputs.ids):
        generator = torch.Generator().manual_seed(sample_seed(seed, sample_id))
        if inputs.has_image(index):
            order = torch.randperm(num_patches, generator=generator)
            keep = num_patches - int(round(num_patches * image_ratios[index]))
            image_keep, image_masked = order[:keep].sort().values, order[keep:].sort().values
        else:
            image_keep = image_masked = EMPTY
        length, ratio = lengths[index], text_ratios[index]
        if length:
            order = torch.randperm(length, generator=generator)
            masked = min(length, max(1 if ratio > 0 else 0, int(round(length * ratio))))
            text_keep, text_masked = order[masked:].sort().values, order[:masked].sort().values
        else:
            text_keep = text_masked = EMPTY
        plans.append(MaskPlan(image_keep, image_masked, text_keep, text_masked))
    return plans


def nothing_masked(inputs: Inputs, num_patches: int) -> list[MaskPlan]:
    """Plans that show the encoder every patch and token (features, alignment passes)."""
    everything = torch.arange(num_patches)
    return [MaskPlan(everything if inputs.has_image(index) else EMPTY, EMPTY, torch.arange(length), EMPTY)
            for index, length in enumerate(inputs.token_lengths.tolist())]


def masked_counts(inputs: Inputs, plans: list[MaskPlan]) -> dict[str, int]:
    """Masked patches, masked caption tokens and masked text-only tokens: what the losses average over."""
    counts = {"image": 0, "paired_text": 0, "unpaired_text": 0}
    for index, plan in enumerate(plans):
        counts["image"] += len(plan.image_masked)
        counts["paired_text" if inputs.has_image(index) else "unpaired_text"] += len(plan.text_masked)
    return counts
