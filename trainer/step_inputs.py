"""What one optimizer step's forward passes receive, prepared where the batch is collated.

`prepare_parts(batch, spec, step)` turns a collated `Batch` into the `Part`s of its forward
passes — one for a packed step, one per kind for MoMo's per-kind step — each with its `Inputs`,
its masks' `Layout` and, for ITC/ITM, its `Alignment`. The loader runs it in its DataLoader
workers (in parallel, ahead of the step), so the training process only moves finished tensors
to the device and launches kernels. Masks are drawn from `step_seed(seed, global step)` and the
sample ids, exactly as if the training process drew them: where the work happens changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .batch import Inputs
from .layout import Alignment, Layout, build_layout
from .masking import Ratios, draw_masks, step_seed


@dataclass(frozen=True)
class StepSpec:
    """What a loader must know of the trainer to prepare its steps (picklable, sent to workers)."""

    num_patches: int
    masking: Any  # Ratios (train.masking)
    seed: int
    use_text: bool = True
    per_kind: bool = False  # train.step_mode: per_kind
    alignment: bool = False  # ITC/ITM are on: prepare the paired samples' passes
    first_step: int = 0  # the global step of the loader's batch 0 (a stage's start)
    batches_per_step: int = 1  # this data rank's micro-batches per optimizer step

    def step_of(self, batch_index: int) -> int:
        """The global step a loader batch belongs to."""
        return self.first_step + batch_index // self.batches_per_step


@dataclass
class Part:
    """One forward pass of a step: the model's inputs (uint8 images until `to()` moves and
    normalises them) and where everything goes."""

    inputs: Inputs
    layout: Layout
    alignment: Optional[Alignment] = None

    def to(self, device, non_blocking: bool = True) -> "Part":
        return Part(self.inputs.to(device, non_blocking), self.layout.to(device, non_blocking),
                    self.alignment.to(device, non_blocking) if self.alignment is not None else None)

    def pin_memory(self) -> "Part":
        return Part(self.inputs.pin_memory(), self.layout.pin_memory(),
                    self.alignment.pin_memory() if self.alignment is not None else None)


def layout_for(inputs: Inputs, num_patches: int, masking: Ratios, seed: int) -> Layout:
    """Masks drawn from `seed` and the Layout they give (CPU tensors; inputs may be anywhere)."""
    image_index, token_lengths = inputs.image_index.cpu(), inputs.token_lengths.cpu()
    masks = draw_masks(inputs.ids, image_index.tolist(), token_lengths.tolist(), num_patches, masking, seed)
    return build_layout(image_index, token_lengths, masks, num_patches)


def part_of(inputs: Inputs, spec: StepSpec, seed: int) -> Part:
    layout = layout_for(inputs, spec.num_patches, spec.masking, seed)
    alignment = Alignment.of(inputs.image_index, inputs.token_lengths, spec.num_patches) if spec.alignment else None
    return Part(inputs, layout, alignment)


def prepare_parts(batch, spec: StepSpec, step: int) -> list[Part]:
    """The forward passes of `batch` (a trainer.batch.Batch, CPU tensors) at global step `step`."""
    if not spec.use_text:
        batch = batch.without_text()
    pieces = batch.by_kind() if spec.per_kind else [batch]
    seed = step_seed(spec.seed, step)
    return [part_of(piece.pixel_inputs(), spec, seed) for piece in pieces]
