"""What flows from the loader to the model: `Batch` (a mixed batch as the loader makes it) and
`Inputs` (the part of it the model reads).

Samples are packed: images are stacked only for the samples that have one (`image_index` maps a
sample to its row, -1 for text-only), caption tokens are concatenated without padding
(`token_lengths`, 0 for image-only), so no memory or FLOP goes to absent parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from .transforms import normalise

KINDS = ("paired", "image", "text")
KIND_CODES = {"paired": 0, "image": 1, "text": 2}
_INPUT_TENSORS = ("images", "image_index", "tokens", "token_lengths")


@dataclass
class Inputs:
    """What the model needs of a batch."""

    images: torch.Tensor  # [N_img, 3, S, S] normalised float, or uint8 pixels [N_img, S, S, 3] that `to()` normalises
    image_index: torch.Tensor  # [B] row in images or -1
    tokens: torch.Tensor  # [T_tok] packed
    token_lengths: torch.Tensor  # [B]
    ids: list[str]  # per-sample keys: masks are drawn per id

    def __len__(self) -> int:
        return len(self.ids)

    def has_image(self, sample: int) -> bool:
        return int(self.image_index[sample]) >= 0

    def to(self, device, non_blocking: bool = True) -> "Inputs":
        """On `device`, with uint8 pixels normalised there (the whole batch in one op)."""
        moved = Inputs(*(getattr(self, name).to(device, non_blocking=non_blocking) for name in _INPUT_TENSORS),
                       self.ids)
        if moved.images.dtype == torch.uint8:
            moved.images = normalise(moved.images)
        return moved

    def pin_memory(self) -> "Inputs":
        return Inputs(*(getattr(self, name).pin_memory() for name in _INPUT_TENSORS), self.ids)

    @classmethod
    def of_images(cls, images: torch.Tensor, ids: Optional[list[str]] = None) -> "Inputs":
        """Image-only samples."""
        count = len(images)
        return cls(images, torch.arange(count), torch.empty(0, dtype=torch.long), torch.zeros(count, dtype=torch.long),
                   ids if ids is not None else [str(index) for index in range(count)])

    @classmethod
    def of_texts(cls, rows: list[torch.Tensor], ids: Optional[list[str]] = None,
                 like: Optional[torch.Tensor] = None) -> "Inputs":
        """Text-only samples from token rows (`like`: an image tensor whose dtype and device to use)."""
        empty = like[:0] if like is not None else torch.empty(0, 3, 1, 1)
        tokens = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
        return cls(empty, torch.full((len(rows),), -1), tokens, torch.tensor([len(row) for row in rows],
                                                                             dtype=torch.long),
                   ids if ids is not None else [str(index) for index in range(len(rows))])


@dataclass
class Batch:
    """One mixed batch. Samples are grouped paired, then image, then text."""

    step: int  # the rank's batch index
    ids: list[str]
    kinds: torch.Tensor  # [B] 0 paired, 1 image, 2 text
    sources: list[str]
    labels: list[Optional[str]]
    images: torch.Tensor  # [N_img, H, W, 3] uint8 pixels of the samples that have one
    image_index: torch.Tensor  # [B] row in `images`, -1 for text-only
    tokens: torch.Tensor  # [sum(token_lengths)] packed, no padding
    token_lengths: torch.Tensor  # [B] 0 for image-only
    epochs: torch.Tensor  # [B] the stream epoch each sample came from
    dropped: int = 0  # samples of this batch lost to unreadable data (train.data_errors: skip)
    # Filled by the loader's workers (trainer.step_inputs) when it prepares training steps:
    step_of: Optional[int] = None  # the global optimizer step this batch belongs to
    parts: Optional[list] = None  # its forward passes (trainer.step_inputs.Part)
    kind_counts: Optional[dict[str, int]] = None  # samples of each kind
    digest: Optional[int] = None  # trainer.metrics.sample_digest of its ids

    def inputs(self) -> Inputs:
        """The model's inputs, images normalised (where the batch is: on the device after `to()`)."""
        images = normalise(self.images) if self.images.dtype == torch.uint8 else self.images
        return Inputs(images, self.image_index, self.tokens, self.token_lengths, self.ids)

    def pixel_inputs(self) -> Inputs:
        """The model's inputs with the images still uint8 (`Inputs.to` normalises them)."""
        return Inputs(self.images, self.image_index, self.tokens, self.token_lengths, self.ids)

    def counts(self) -> dict[str, int]:
        if self.kind_counts is not None:
            return self.kind_counts
        return {kind: int((self.kinds == code).sum()) for kind, code in KIND_CODES.items()}

    def padded_tokens(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, max_len] token ids and a bool mask of real tokens (for padded attention)."""
        rows = torch.split(self.tokens, self.token_lengths.tolist())
        width = max(1, int(self.token_lengths.max())) if len(rows) else 1
        out = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for index, row in enumerate(rows):
            out[index, : len(row)] = row
        mask = torch.arange(width)[None, :] < self.token_lengths[:, None]
        return out, mask

    def select(self, indices: list[int]) -> "Batch":
        """A batch of some of this batch's samples (in the given order)."""
        token_rows = torch.split(self.tokens, self.token_lengths.tolist())
        image_rows = [int(self.image_index[i]) for i in indices]
        kept_images = [row for row in image_rows if row >= 0]
        new_index, next_row = [], 0
        for row in image_rows:
            new_index.append(next_row if row >= 0 else -1)
            next_row += row >= 0
        return Batch(
            step=self.step,
            ids=[self.ids[i] for i in indices],
            kinds=self.kinds[indices],
            sources=[self.sources[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            images=self.images[kept_images] if kept_images else self.images[:0],
            image_index=torch.tensor(new_index, dtype=torch.long),
            tokens=torch.cat([token_rows[i] for i in indices]) if indices else self.tokens[:0],
            token_lengths=self.token_lengths[indices],
            epochs=self.epochs[indices],
        )

    def by_kind(self) -> list["Batch"]:
        """One batch per kind present (MoMo's per-kind steps)."""
        return [self.select(indices) for code in range(len(KINDS))
                if (indices := (self.kinds == code).nonzero().flatten().tolist())]

    def without_text(self) -> "Batch":
        """The same samples with every token dropped (the MAE baseline uses captions as nothing)."""
        return Batch(step=self.step, ids=self.ids, kinds=self.kinds, sources=self.sources, labels=self.labels,
                     images=self.images, image_index=self.image_index, tokens=self.tokens[:0],
                     token_lengths=torch.zeros_like(self.token_lengths), epochs=self.epochs,
                     dropped=self.dropped)

    def pin_memory(self) -> "Batch":
        """What the DataLoader calls when it pins: the step's parts (what goes to the device)."""
        if self.parts is not None:
            self.parts = [part.pin_memory() for part in self.parts]
        else:
            for name in ("kinds", "images", "image_index", "tokens", "token_lengths", "epochs"):
                setattr(self, name, getattr(self, name).pin_memory())
        return self

    def to(self, device, non_blocking: bool = True) -> "Batch":
        for name in ("kinds", "images", "image_index", "tokens", "token_lengths", "epochs"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=non_blocking))
        return self
