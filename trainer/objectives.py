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
from mmae.trainer.batch import Inputs

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
    encoder_tokens: int
    decoder_tokens: int
    anchor: torch.Tensor


class AlignmentHeads(Protocol):
    """What ITC/ITM need of a model: an unmasked CLS feature pass and the alignment heads."""

    cls_token: torch.Tensor
    logit_scale: torch.Tensor
    itc_image_proj: Callable[[torch.Tensor], torch.Tensor]
    itc_text_proj: Callable[[torch.Tensor], torch.Tensor]
    itm_head: Callable[[torch.Tensor], torch.Tensor]

    def cls_features(self, inputs: Inputs) -> torch.Tensor: ...


@dataclass
class DefaultWeights:
    image: float = 1.0
    text: float = 1.0
    unpaired_text: float = 1.0
    itc: float = 0.0
    itm: float = 0.0


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
    """Pixel and token losses of one forward; `normalisers` default to this batch's own counts."""
    zero = predictions.anchor
    image_sum = zero
    if len(predictions.pixels):
        image_sum = pixel_loss_sum(predictions.pixels, predictions.pixel_targets, norm_pix)
    paired_sum = unpaired_sum = zero
    paired = predictions.token_paired
    if len(predictions.token_logits):
        losses = F.cross_entropy(predictions.token_logits.float(), predictions.token_targets, reduction="none")
        paired_sum, unpaired_sum = losses[paired].sum(), losses[~paired].sum()
    paired_count = int(paired.sum())
    counts = {"image": len(predictions.pixels), "paired_text": paired_count,
              "unpaired_text": len(paired) - paired_count}
    norm = normalisers or counts
    image_loss = image_sum / max(1, norm["image"])
    text_loss = paired_sum / max(1, norm["paired_text"])
    unpaired_loss = unpaired_sum / max(1, norm["unpaired_text"])
    loss = weights.image * image_loss + weights.text * text_loss + weights.unpaired_text * unpaired_loss
    return Losses(loss, image_loss, text_loss, unpaired_loss, counts, predictions.encoder_tokens,
                  predictions.decoder_tokens)


def alignment_losses(model: AlignmentHeads, inputs: Inputs, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC between image-only and text-only passes of the paired samples (gathered over ranks),
    and ITM on joint passes: each pair, plus one hard negative text per image and one hard
    negative image per text, drawn from the in-batch ITC similarities."""
    device = model.cls_token.device
    lengths = inputs.token_lengths.tolist()
    paired = [i for i in range(len(lengths)) if inputs.has_image(i) and lengths[i] > 0]
    zero = model.logit_scale.sum() * 0.0
    if len(paired) < 2:
        return zero, zero
    token_rows = torch.split(inputs.tokens, lengths)
    images = inputs.images[inputs.image_index[paired]]
    texts = [token_rows[i] for i in paired]
    n = len(paired)

    def joint(image_rows: list[int], text_rows: list[int]) -> Inputs:
        return Inputs(images[image_rows], torch.arange(len(image_rows)), torch.cat([texts[j] for j in text_rows]),
                      torch.tensor([len(texts[j]) for j in text_rows]), [str(k) for k in range(len(image_rows))])

    image_z = F.normalize(model.itc_image_proj(model.cls_features(Inputs.of_images(images))), dim=-1)
    text_z = F.normalize(model.itc_text_proj(model.cls_features(Inputs.of_texts(texts, like=images))), dim=-1)
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
    image_rows = list(range(n)) + list(range(n)) + negative_image.tolist()
    text_rows = list(range(n)) + negative_text.tolist() + list(range(n))
    logits = model.itm_head(model.cls_features(joint(image_rows, text_rows)))
    targets = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(device)
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
