"""The losses, from named predictions, and the collectives they need.

- pixels (MAE): MSE of the predicted masked patches, optionally against per-patch normalised
  targets (`norm_pix_loss`), summed here and divided by the global step's masked-patch count;
- tokens (M3AE): cross-entropy of the predicted masked tokens, paired captions and text-only
  samples apart (each its own weight and count);
- ITC/ITM (MaskVLM): contrastive loss between image-only and text-only passes of the paired
  samples, gathered over ranks; matching loss on joint passes with hard negatives.

Sums are divided by *global* counts (`normalisers`: all micro-batches, all ranks), so a step's
update is the same whatever the split over ranks and micro-batches. This module holds every
collective of the loss (`gather_rows`, `rank_offset`); the model itself never communicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from .batch import Inputs
from .layout import Alignment, Layout, gather_segments, unmasked_layout

LOSS_NAMES = ("loss", "image_loss", "text_loss", "unpaired_text_loss", "itc_loss", "itm_loss")  # fields of Losses


class Weights(Protocol):
    image: float
    text: float
    unpaired_text: float
    itc: float
    itm: float


class Prediction(Protocol):
    """What `masked_losses` reads of a model's predictions (trainer.model.Predictions)."""

    pixels: torch.Tensor
    pixel_targets: torch.Tensor
    token_logits: torch.Tensor
    token_targets: torch.Tensor
    token_paired: torch.Tensor
    counts: dict[str, int]
    encoder_tokens: int
    decoder_tokens: int
    anchor: torch.Tensor


class AlignmentHeads(Protocol):
    """What ITC/ITM need of a model: an unmasked CLS feature pass and the alignment heads."""

    cls_token: torch.Tensor
    logit_scale: torch.Tensor
    num_patches: int
    itc_image_proj: Callable[[torch.Tensor], torch.Tensor]
    itc_text_proj: Callable[[torch.Tensor], torch.Tensor]
    itm_head: Callable[[torch.Tensor], torch.Tensor]

    def cls_features(self, inputs: Inputs, layout: Optional[Layout] = None) -> torch.Tensor: ...


@dataclass
class Losses:
    loss: torch.Tensor  # the weighted sum that is back-propagated
    image_loss: torch.Tensor
    text_loss: torch.Tensor
    unpaired_text_loss: torch.Tensor
    counts: dict[str, int]  # masked patches / text tokens of this batch that carried a loss
    encoder_tokens: int
    decoder_tokens: int
    itc_loss: Optional[torch.Tensor] = None
    itm_loss: Optional[torch.Tensor] = None


def pixel_loss_sum(predicted: torch.Tensor, target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Sum over masked patches of the per-patch mean squared error."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return ((predicted - target) ** 2).mean(dim=-1).sum()


def masked_losses(predictions: Prediction, weights: Weights, norm_pix: bool,
                  normalisers: Optional[dict[str, float]] = None) -> Losses:
    """Pixel and token losses of one forward; `normalisers` default to this batch's own counts.

    Every count is a host integer of the layout (paired caption tokens come first among the
    targets), so nothing here reads a device value."""
    zero = predictions.anchor
    counts = predictions.counts
    image_sum = zero
    if len(predictions.pixels):
        image_sum = pixel_loss_sum(predictions.pixels, predictions.pixel_targets, norm_pix)
    paired_sum = unpaired_sum = zero
    if len(predictions.token_logits):
        losses = F.cross_entropy(predictions.token_logits.float(), predictions.token_targets, reduction="none")
        paired = counts["paired_text"]
        paired_sum, unpaired_sum = losses[:paired].sum(), losses[paired:].sum()
    norm = normalisers or counts
    image_loss = image_sum / max(1, norm["image"])
    text_loss = paired_sum / max(1, norm["paired_text"])
    unpaired_loss = unpaired_sum / max(1, norm["unpaired_text"])
    loss = weights.image * image_loss + weights.text * text_loss + weights.unpaired_text * unpaired_loss
    return Losses(loss, image_loss, text_loss, unpaired_loss, counts, predictions.encoder_tokens,
                  predictions.decoder_tokens)


def alignment_losses(model: AlignmentHeads, inputs: Inputs, alignment: Optional[Alignment],
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC between image-only and text-only passes of the paired samples (gathered over ranks),
    and ITM on joint passes: each pair, plus one hard negative text per image and one hard
    negative image per text, drawn from the in-batch ITC similarities.

    The passes' layouts come prepared with the batch (`alignment`), except the ITM pass's, which
    depends on the drawn negatives: drawing them on the host (the generator of earlier runs) costs
    one device-to-host copy of the n x n similarities per step, the one read of a MaskVLM step."""
    zero = model.logit_scale.sum() * 0.0
    if alignment is None:
        return zero, zero
    device = model.cls_token.device
    n = alignment.pairs
    images = inputs.images[alignment.image_rows]
    captions = inputs.tokens[alignment.token_index]
    image_only = Inputs(images, torch.arange(n, device=device), captions[:0],
                        torch.zeros(n, dtype=torch.long, device=device), [])
    text_only = Inputs(images[:0], torch.full((n,), -1, device=device), captions,
                       alignment.text_lengths.to(device, non_blocking=True), [])
    image_z = F.normalize(model.itc_image_proj(model.cls_features(image_only, alignment.images_only)), dim=-1)
    text_z = F.normalize(model.itc_text_proj(model.cls_features(text_only, alignment.texts_only)), dim=-1)
    all_image, all_text, offset = gather_rows(image_z), gather_rows(text_z), rank_offset(n, image_z.device)
    scale = model.logit_scale.exp().clamp(max=100)
    labels = torch.arange(n, device=device) + offset
    itc = (F.cross_entropy(scale * image_z @ all_text.T, labels)
           + F.cross_entropy(scale * text_z @ all_image.T, labels)) / 2

    with torch.no_grad():  # hard negatives, sampled in proportion to similarity
        similarity = (image_z @ text_z.T).float()
        similarity.fill_diagonal_(-float("inf"))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        negative_text = torch.multinomial(similarity.softmax(dim=1).cpu(), 1, generator=generator).flatten()
        negative_image = torch.multinomial(similarity.T.softmax(dim=1).cpu(), 1, generator=generator).flatten()
    pairs = torch.arange(n)
    image_rows = torch.cat([pairs, pairs, negative_image])
    text_rows = torch.cat([pairs, negative_text, pairs])
    lengths = alignment.text_lengths[text_rows]
    joint = Inputs(images[image_rows.to(device, non_blocking=True)], torch.arange(3 * n, device=device),
                   captions[gather_segments(alignment.text_lengths, text_rows).to(device, non_blocking=True)],
                   lengths.to(device, non_blocking=True), [])
    layout = unmasked_layout(torch.arange(3 * n), lengths, model.num_patches).to(device)
    logits = model.itm_head(model.cls_features(joint, layout))
    targets = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(device, non_blocking=True)
    return itc, F.cross_entropy(logits.float(), targets)


# ------------------------------------------------------------------------------------------
# Collectives


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """All ranks' equal-shaped tensors stacked; the backward sums every rank's gradient for our slice.

    Ten lines over plain c10d calls: ``torch.distributed.nn.functional.all_gather`` warns that it
    is deprecated on every call (torch 2.13) and its suggested replacement is a private module.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank = dist.get_rank()
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def _row_counts(count: int, device: torch.device | str) -> list[int]:
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([count], device=device))  # NCCL takes device tensors only
    return [int(size.item()) for size in sizes]


def gather_rows(features: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (with gradients for ours); ranks may hold different numbers of rows."""
    if not _distributed():
        return features
    sizes = _row_counts(len(features), features.device)
    parts = _AllGather.apply(F.pad(features, (0, 0, 0, max(sizes) - len(features))))
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def rank_offset(count: int, device: torch.device | str = "cpu") -> int:
    """Rows of the ranks before this one (where this rank's rows sit in `gather_rows`)."""
    if not _distributed():
        return 0
    import torch.distributed as dist

    return sum(_row_counts(count, device)[: dist.get_rank()])
