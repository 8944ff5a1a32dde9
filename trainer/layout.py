"""Where every row of a batch goes in the encoder and the decoder: `Layout`, built as tensors.

The model works on packed rows. For sample `i` the decoder sees
`[CLS | all P patches (if it has an image) | all its tokens]` and the encoder sees the same
sequence less what `Masks` hides. A `Layout` holds, as index tensors, everything the step needs
to know about that arrangement — which embedding each encoder row gathers, what each decoder row
is (an encoded row or a mask token, its type and position), where the loss targets sit, the
sequence lengths — plus the host-side integers (lengths, masked counts) that sizes and loss
normalisers need, so the training process never reads a device tensor to learn a shape.

`build_layout` is whole-batch tensor arithmetic (no loop over samples, patches or tokens). The
loader calls it in its worker processes (`trainer.step_inputs`), so the step receives a finished
layout, pinned and moved with `non_blocking=True`; evaluation code calls it in place.

The embedding pool the encoder gathers from is `[CLS | image rows x P patches | packed tokens]`;
the decoder pool is `[encoded rows | image mask token | text mask token]`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from .masking import Masks

CLS, IMAGE, TEXT = 0, 1, 2  # modality-type ids (the model's type embeddings)


def _starts(lengths: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums: where each of a run of consecutive segments starts."""
    return torch.cumsum(lengths, 0) - lengths


def _owner(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """For each of `total` rows, the segment it belongs to."""
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths, output_size=total)


def _move(value, device, non_blocking: bool):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(value):
        return value.to(device, non_blocking)
    return value


class _Tensors:
    """`to`/`pin_memory` over every tensor field (and nested layouts) of a dataclass."""

    def to(self, device, non_blocking: bool = True):
        return dataclasses.replace(self, **{field.name: _move(getattr(self, field.name), device, non_blocking)
                                            for field in dataclasses.fields(self)})

    def pin_memory(self):
        def pin(value):
            if isinstance(value, torch.Tensor):
                return value.pin_memory()
            return value.pin_memory() if dataclasses.is_dataclass(value) else value

        return dataclasses.replace(self, **{field.name: pin(getattr(self, field.name))
                                            for field in dataclasses.fields(self)})


@dataclass
class Sequences(_Tensors):
    """Packed rows `[T, D]` cut into sequences, and what each attention backend needs of that."""

    seqlens: list[int]  # host: per-sequence lengths (xformers' BlockDiagonalMask)
    width: int  # host: the longest sequence (the padded layout's L)
    padded_index: torch.Tensor  # [T] position of each packed row in the padded [B * width] grid
    key_padding: torch.Tensor  # [B, width] bool, True for real rows
    cu_seqlens: torch.Tensor  # [B + 1] int32 sequence starts (varlen kernels)
    uniform: bool = False  # host: every sequence is `width` long (no padding, no mask needed)

    @classmethod
    def of(cls, lengths: torch.Tensor) -> "Sequences":
        total = int(lengths.sum())
        width = int(lengths.max()) if len(lengths) else 0
        owner = _owner(lengths, total)
        starts = _starts(lengths)
        within = torch.arange(total) - starts[owner]
        return cls(lengths.tolist(), width, owner * width + within,
                   torch.arange(width)[None, :] < lengths[:, None],
                   torch.cat([starts, lengths.sum().reshape(1)]).to(torch.int32),
                   uniform=bool(len(lengths)) and total == width * len(lengths))

    @property
    def rows(self) -> int:
        return len(self.padded_index)


@dataclass
class Layout(_Tensors):
    """The arrangement of one forward pass of a batch (see the module docstring)."""

    encoder_index: torch.Tensor  # [T_enc] row of the embedding pool each encoder row takes
    encoder: Sequences
    cls_rows: torch.Tensor  # [B] encoder row of each sample's CLS
    text_positions: torch.Tensor  # [T_tok] each packed token's position in its sample
    decoder_index: torch.Tensor  # [T_dec] row of the decoder pool each decoder row takes
    decoder_types: torch.Tensor  # [T_dec] CLS / IMAGE / TEXT
    decoder_positions: torch.Tensor  # [T_dec] row of [zero | P image positions | text positions]
    decoder: Sequences
    pixel_rows: torch.Tensor  # [M] decoder row of each masked patch, by (sample, patch)
    pixel_at: torch.Tensor  # [M, 2] (image row, patch) of each
    token_rows: torch.Tensor  # [K] decoder row of each masked token: paired captions first
    token_at: torch.Tensor  # [K] index of each in the packed tokens
    token_paired: torch.Tensor  # [K] bool: a caption token of a sample with an image
    masked_images: int  # host: M
    masked_paired_text: int  # host: the first masked_paired_text of the K tokens
    masked_unpaired_text: int  # host: the rest

    @property
    def encoder_tokens(self) -> int:
        return self.encoder.rows

    @property
    def decoder_tokens(self) -> int:
        return self.decoder.rows

    def counts(self) -> dict[str, int]:
        """Masked patches, masked caption tokens and masked text-only tokens: what the losses average over."""
        return {"image": self.masked_images, "paired_text": self.masked_paired_text,
                "unpaired_text": self.masked_unpaired_text}


def build_layout(image_index: torch.Tensor, token_lengths: torch.Tensor, masks: Masks, num_patches: int) -> Layout:
    """The Layout of a batch (CPU tensors: `image_index` [B], `token_lengths` [B]) under `masks`."""
    patches = num_patches
    samples = len(image_index)
    has_image = image_index >= 0
    images = masks.image_masked.shape[0]
    tokens = len(masks.text_masked)
    per_sample = 1 + patches * has_image.long() + token_lengths  # decoder rows of each sample
    start = _starts(per_sample)
    total = int(per_sample.sum())

    # Every decoder row ("element"): its pool row, type, position and whether the encoder sees it.
    pool_index = torch.empty(total, dtype=torch.long)
    types = torch.empty(total, dtype=torch.long)
    positions = torch.empty(total, dtype=torch.long)
    kept = torch.empty(total, dtype=torch.bool)
    pool_index[start], types[start], positions[start], kept[start] = 0, CLS, 0, True

    sample_of_image = torch.empty(images, dtype=torch.long)
    sample_of_image[image_index[has_image]] = torch.arange(samples)[has_image]
    patch_rows = (start[sample_of_image][:, None] + 1 + torch.arange(patches)[None, :]).flatten()
    pool_index[patch_rows] = 1 + torch.arange(images * patches)
    types[patch_rows] = IMAGE
    positions[patch_rows] = 1 + torch.arange(patches).repeat(images)
    kept[patch_rows] = ~masks.image_masked.flatten()

    sample_of_token = _owner(token_lengths, tokens)
    text_positions = torch.arange(tokens) - _starts(token_lengths)[sample_of_token]
    token_rows_all = start[sample_of_token] + 1 + patches * has_image[sample_of_token].long() + text_positions
    pool_index[token_rows_all] = 1 + images * patches + torch.arange(tokens)
    types[token_rows_all] = TEXT
    positions[token_rows_all] = 1 + patches + text_positions
    kept[token_rows_all] = ~masks.text_masked

    # Encoder: the kept elements, in order; decoder: every element, an encoded row or a mask token.
    element_sample = _owner(per_sample, total)
    encoder_elements = kept.nonzero().flatten()
    encoder_lengths = torch.bincount(element_sample[encoder_elements], minlength=samples)
    encoder_rows = len(encoder_elements)
    decoder_index = torch.where(types == IMAGE, encoder_rows, encoder_rows + 1)
    decoder_index[encoder_elements] = torch.arange(encoder_rows)

    pixel_rows = (~kept & (types == IMAGE)).nonzero().flatten()
    text_targets = (~kept & (types == TEXT)).nonzero().flatten()
    paired = has_image[element_sample[text_targets]]
    token_rows = torch.cat([text_targets[paired], text_targets[~paired]])  # stable: paired captions first
    flat_patch = pool_index[pixel_rows] - 1
    token_at = pool_index[token_rows] - 1 - images * patches
    masked_paired = int(paired.sum())
    return Layout(
        encoder_index=pool_index[encoder_elements], encoder=Sequences.of(encoder_lengths),
        cls_rows=_starts(encoder_lengths), text_positions=text_positions,
        decoder_index=decoder_index, decoder_types=types, decoder_positions=positions,
        decoder=Sequences.of(per_sample),
        pixel_rows=pixel_rows, pixel_at=torch.stack([flat_patch // patches, flat_patch % patches], dim=1),
        token_rows=token_rows, token_at=token_at,
        token_paired=torch.arange(len(token_rows)) < masked_paired,
        masked_images=len(pixel_rows), masked_paired_text=masked_paired,
        masked_unpaired_text=len(token_rows) - masked_paired)


def unmasked_layout(image_index: torch.Tensor, token_lengths: torch.Tensor, num_patches: int) -> Layout:
    """The Layout that shows the encoder everything (features, alignment passes)."""
    images = int((image_index >= 0).sum())
    return build_layout(image_index, token_lengths, Masks.nothing(images, num_patches, int(token_lengths.sum())),
                        num_patches)


def gather_segments(lengths: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Rows of the packed segments `chosen` (with repeats), concatenated: an index into the packing
    whose segment lengths are `lengths`."""
    chosen_lengths = lengths[chosen]
    total = int(chosen_lengths.sum())
    owner = _owner(chosen_lengths, total)
    return _starts(lengths)[chosen][owner] + torch.arange(total) - _starts(chosen_lengths)[owner]


@dataclass
class Alignment(_Tensors):
    """What ITC/ITM need of a batch, decided when it is collated: the paired samples (an image and
    a non-empty caption), their images' rows, their captions' packed tokens, and the unmasked
    layouts of the image-only and text-only passes."""

    pairs: int  # host
    image_rows: torch.Tensor  # [n] rows of the batch's images
    token_index: torch.Tensor  # [sum of caption lengths] rows of the batch's packed tokens
    text_lengths: torch.Tensor  # [n] caption lengths (kept on the host: the ITM pass is built from it)
    images_only: Layout
    texts_only: Layout

    @classmethod
    def of(cls, image_index: torch.Tensor, token_lengths: torch.Tensor, num_patches: int) -> Optional["Alignment"]:
        pairs = ((image_index >= 0) & (token_lengths > 0)).nonzero().flatten()
        if len(pairs) < 2:
            return None
        count = len(pairs)
        lengths = token_lengths[pairs]
        return cls(count, image_index[pairs], gather_segments(token_lengths, pairs), lengths,
                   unmasked_layout(torch.arange(count), torch.zeros(count, dtype=torch.long), num_patches),
                   unmasked_layout(torch.full((count,), -1), lengths, num_patches))

    def to(self, device, non_blocking: bool = True):
        moved = super().to(device, non_blocking)
        moved.text_lengths = self.text_lengths  # the host builds the ITM pass from it
        return moved
