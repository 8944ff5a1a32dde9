"""A picture of what the model reconstructs: per sample, original | masked | reconstruction,
with the caption, the masked caption and the caption with the predicted tokens filled in."""

from __future__ import annotations

from typing import Optional

import torch
from .batch import Inputs
from .layout import Layout
from .transforms import MEAN, STD

CELL, TEXT_HEIGHT = 192, 64


@torch.no_grad()
def render(model, inputs: Inputs, layout: Layout, limit: int = 6, tokenizer=None):
    """A PIL image of the first `limit` samples of `inputs` that have an image."""
    from PIL import Image, ImageDraw

    chosen = [index for index in range(len(inputs)) if inputs.has_image(index)][:limit]
    predictions = model.predict(inputs, layout)
    patches = model.patchify(inputs.images.float()).cpu()  # [N, P, p*p*3]
    predicted, masked_view = patches.clone(), patches.clone()
    grey = ((torch.tensor([0.5, 0.5, 0.5]) - MEAN.flatten()) / STD.flatten()).repeat(model.patch_size**2)
    for (image_row, patch), value in zip(predictions.pixel_at.tolist(), predictions.pixels.float().cpu()):
        target = patches[image_row, patch]
        if model.norm_pix_loss:  # undo the per-patch normalisation with the true patch's statistics
            value = value * (target.var() + 1e-6) ** 0.5 + target.mean()
        predicted[image_row, patch] = value
        masked_view[image_row, patch] = grey
    guesses = dict(zip(predictions.token_at.tolist(), predictions.token_logits.argmax(dim=-1).tolist()))

    def to_pil(tensor: torch.Tensor):
        pixels = (tensor * STD + MEAN).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
        return Image.fromarray(pixels).resize((CELL, CELL), Image.Resampling.NEAREST)

    def text_of(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    lengths = inputs.token_lengths.tolist()
    offsets = [sum(lengths[:index]) for index in range(len(lengths))]
    sheet = Image.new("RGB", (3 * CELL + 40, max(1, len(chosen)) * (CELL + TEXT_HEIGHT) + 10), "white")
    draw = ImageDraw.Draw(sheet)
    for line, sample in enumerate(chosen):
        top = line * (CELL + TEXT_HEIGHT) + 5
        row = int(inputs.image_index[sample])
        views = (inputs.images[row].float().cpu(), model.unpatchify(masked_view[row:row + 1])[0],
                 model.unpatchify(predicted[row:row + 1])[0])
        for column, tensor in enumerate(views):
            sheet.paste(to_pil(tensor), (10 + column * (CELL + 10), top))
        if not lengths[sample]:
            continue
        start = offsets[sample]
        ids = inputs.tokens[start:start + lengths[sample]].tolist()
        hidden = {at - start for at in guesses if start <= at < start + lengths[sample]}
        masked_words = " ".join("[MASK]" if i in hidden else text_of([t]) for i, t in enumerate(ids))
        filled = [guesses.get(start + i, t) if i in hidden else t for i, t in enumerate(ids)]
        for number, text in enumerate((f"caption:   {text_of(ids)}", f"masked:    {masked_words}",
                                       f"predicted: {text_of(filled)}")):
            draw.text((10, top + CELL + 4 + 18 * number), text[:110], fill="black")
    return sheet


def load_tokenizer(dataset: str) -> Optional[object]:
    """The dataset's SentencePiece model, or None (captions are then shown as token ids)."""
    import logging

    import fsspec
    import sentencepiece as spm
    from mmae.schemas.manifest import read_manifest

    entry = read_manifest(dataset).tokenizer
    if entry is None:
        return None
    path = f"{dataset.rstrip('/')}/{entry.path}"
    try:
        with fsspec.open(path, "rb") as handle:
            return spm.SentencePieceProcessor(model_proto=handle.read())
    except (FileNotFoundError, RuntimeError) as error:
        logging.getLogger("mmae.eval").warning("cannot load %s (%s): captions are written as token ids", path, error)
        return None
