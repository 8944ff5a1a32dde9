"""`mmae eval probe`: MAE's linear-probe protocol on frozen features.

    mmae eval probe --checkpoint RUN/checkpoints/step-0001500.pt --data build/demo/shards [--json]

Features are the CLS token of an unmasked, image-only forward (or the mean of the patch
tokens with `--pool mean`) of each labelled image's deterministic centre view. The probe is
BatchNorm without affine + a linear layer (MAE's protocol), trained with AdamW on the
features; the split is deterministic by id (80/20), or the dataset's own `split` column when it
has one. Prints top-1 accuracy (`--json`: {"top1", "n_train", "n_test", "classes"}).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import fsspec
import pyarrow.parquet as pq
import torch

from trainer.checkpoint import load_model
from trainer.data import DataError, read_manifest
from trainer.transforms import eval_view

log = logging.getLogger("mmae.eval")


def labelled_rows(dataset: str) -> list[dict[str, Any]]:
    """id, image bytes, label (and split) of every row that has both an image and a label."""
    manifest = read_manifest(dataset)
    rows = []
    for entry in manifest["shards"]:
        if entry["kind"] not in ("paired", "image"):
            continue
        url = f"{dataset.rstrip('/')}/{entry['path']}"
        with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
            columns = [c for c in ("id", "image", "label", "split") if c in parquet.schema_arrow.names]
            for row in parquet.read(columns=columns).to_pylist():
                if row.get("label") is not None and row.get("image"):
                    rows.append(row)
    if not rows:
        raise DataError(f"{dataset}: no rows with both an image and a label (build with a label_column)")
    return sorted(rows, key=lambda row: row["id"])


def split_of(row: dict[str, Any]) -> str:
    if row.get("split") in ("train", "test"):
        return row["split"]
    bucket = int.from_bytes(hashlib.blake2b(row["id"].encode(), digest_size=4).digest(), "little") % 100
    return "test" if bucket < 20 else "train"


@torch.no_grad()
def features(model, rows: list[dict[str, Any]], pool: str, batch_size: int = 256) -> torch.Tensor:
    out = []
    for start in range(0, len(rows), batch_size):
        images = torch.stack([eval_view(row["image"], model.image_size) for row in rows[start:start + batch_size]])
        if pool == "cls":
            out.append(model.encode_images(images))
        else:
            out.append(model.encode_images(images, pool="mean"))
    return torch.cat(out)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, epochs: int = 100, lr: float = 1e-2, seed: int = 0) -> float:
    torch.manual_seed(seed)
    probe = torch.nn.Sequential(torch.nn.BatchNorm1d(train_x.shape[1], affine=False),
                                torch.nn.Linear(train_x.shape[1], classes))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), 256):
            index = order[start:start + 256]
            loss = torch.nn.functional.cross_entropy(probe(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    probe.eval()
    with torch.no_grad():
        return float((probe(test_x).argmax(dim=1) == test_y).float().mean())


def probe(checkpoint: str, dataset: str, pool: str = "cls", epochs: int = 100, seed: int = 0) -> dict[str, Any]:
    model, _ = load_model(checkpoint)
    rows = labelled_rows(dataset)
    names = sorted({row["label"] for row in rows})
    index = {name: number for number, name in enumerate(names)}
    train_rows = [row for row in rows if split_of(row) == "train"]
    test_rows = [row for row in rows if split_of(row) == "test"]
    if not train_rows or not test_rows:
        raise DataError(f"{dataset}: the split left {len(train_rows)} train and {len(test_rows)} test rows")
    train_x, test_x = features(model, train_rows, pool), features(model, test_rows, pool)
    train_y = torch.tensor([index[row["label"]] for row in train_rows])
    test_y = torch.tensor([index[row["label"]] for row in test_rows])
    top1 = linear_probe(train_x, train_y, test_x, test_y, len(names), epochs=epochs, seed=seed)
    return {"top1": top1, "n_train": len(train_rows), "n_test": len(test_rows), "classes": len(names)}


def paired_rows(dataset: str, limit: int) -> list[dict[str, Any]]:
    manifest = read_manifest(dataset)
    rows = []
    for entry in manifest["shards"]:
        if entry["kind"] != "paired":
            continue
        url = f"{dataset.rstrip('/')}/{entry['path']}"
        with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
            rows += [row for row in parquet.read(columns=["id", "image", "tokens"]).to_pylist() if row["tokens"]]
    rows.sort(key=lambda row: row["id"])
    if len(rows) < 2:
        raise DataError(f"{dataset}: retrieval needs at least 2 paired rows")
    return rows[:limit]


@torch.no_grad()
def retrieval(checkpoint: str, dataset: str, limit: int = 1000) -> dict[str, Any]:
    """Image->text and text->image recall@1/5 over the dataset's paired rows (first `limit` by id)."""
    from trainer.model import Inputs

    model, _ = load_model(checkpoint)
    if not model.alignment:
        raise DataError(f"{checkpoint} was trained without ITC (train.loss_weights.itc = 0): no retrieval heads")
    rows = paired_rows(dataset, limit)
    image_z, text_z = [], []
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        images = torch.stack([eval_view(row["image"], model.image_size) for row in chunk])
        tokens = [torch.tensor(row["tokens"][: model.max_text_tokens]) for row in chunk]
        n = len(chunk)
        image_inputs = Inputs(images, torch.arange(n), torch.empty(0, dtype=torch.long),
                              torch.zeros(n, dtype=torch.long), [row["id"] for row in chunk])
        text_inputs = Inputs(images[:0], torch.full((n,), -1), torch.cat(tokens),
                             torch.tensor([len(t) for t in tokens]), [row["id"] for row in chunk])
        image_z.append(torch.nn.functional.normalize(model.itc_image_proj(model.cls_features(image_inputs)), dim=-1))
        text_z.append(torch.nn.functional.normalize(model.itc_text_proj(model.cls_features(text_inputs)), dim=-1))
    similarity = torch.cat(image_z) @ torch.cat(text_z).T  # [N images, N texts]
    truth = torch.arange(len(rows))

    def recall(scores: torch.Tensor, k: int) -> float:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        return float((top == truth[:, None]).any(dim=1).float().mean())

    return {"n": len(rows), "image_to_text": {"r1": recall(similarity, 1), "r5": recall(similarity, 5)},
            "text_to_image": {"r1": recall(similarity.T, 1), "r5": recall(similarity.T, 5)}}


def reconstruct(checkpoint: str, dataset: str, out: str, count: int = 6, seed: int = 0,
                image_ratio: float = 0.75, text_ratio: float = 0.75) -> dict[str, Any]:
    """A PNG grid: original | masked | reconstruction per sample, with the caption, the masked
    caption and the caption with the predicted tokens filled in written underneath."""
    import sentencepiece as spm
    from PIL import Image, ImageDraw

    from trainer.model import Inputs
    from trainer.transforms import MEAN, STD

    model, _ = load_model(checkpoint)
    manifest = read_manifest(dataset)
    tokenizer = None
    if manifest.get("tokenizer"):
        path = f"{dataset.rstrip('/')}/{manifest['tokenizer']['path']}"
        try:
            with fsspec.open(path, "rb") as handle:
                tokenizer = spm.SentencePieceProcessor(model_proto=handle.read())
        except (FileNotFoundError, RuntimeError) as error:
            log.warning("cannot load %s (%s): captions are written as token ids", path, error)
    rows = paired_rows(dataset, count)
    images = torch.stack([eval_view(row["image"], model.image_size) for row in rows])
    tokens = [torch.tensor(row["tokens"][: model.max_text_tokens]) for row in rows]
    inputs = Inputs(images, torch.arange(len(rows)), torch.cat(tokens), torch.tensor([len(t) for t in tokens]),
                    [row["id"] for row in rows])
    with torch.no_grad():
        plans = model.random_masking(inputs, image_ratio, text_ratio, seed)
        encoded, seqlens, _ = model.forward_encoder(inputs, plans)
        decoded, image_targets, text_targets = model.forward_decoder(encoded, seqlens, inputs, plans)
        patches = model.patchify(images)  # [N, P, p*p*3]
        predicted = patches.clone()
        masked_view = patches.clone()
        if image_targets:
            rows_t = torch.tensor([t[0] for t in image_targets])
            guess = model.image_head(decoded[rows_t])
            for (_, image_row, patch, _), value in zip(image_targets, guess):
                target = patches[image_row, patch]
                if model.norm_pix_loss:  # undo the per-patch normalisation with the true patch's statistics
                    value = value * (target.var() + 1e-6) ** 0.5 + target.mean()
                predicted[image_row, patch] = value
                masked_view[image_row, patch] = (torch.tensor([0.5, 0.5, 0.5]) - MEAN.flatten()).div(
                    STD.flatten()).repeat(model.patch_size**2)
        token_guess = {}
        if text_targets:
            logits = model.text_head(decoded[torch.tensor([t[0] for t in text_targets])])
            for (_, flat_index, _, _), best in zip(text_targets, logits.argmax(dim=-1).tolist()):
                token_guess[flat_index] = best

    def to_pil(tensor: torch.Tensor) -> Image.Image:
        pixels = (tensor * STD + MEAN).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
        return Image.fromarray(pixels).resize((192, 192), Image.Resampling.NEAREST)

    def text_of(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    cell, text_height = 192, 64
    sheet = Image.new("RGB", (3 * cell + 40, len(rows) * (cell + text_height) + 10), "white")
    draw = ImageDraw.Draw(sheet)
    offset = 0
    for index, row in enumerate(rows):
        top = index * (cell + text_height) + 5
        for column, tensor in enumerate((images[index], model.unpatchify(masked_view[index:index + 1])[0],
                                         model.unpatchify(predicted[index:index + 1])[0])):
            sheet.paste(to_pil(tensor), (10 + column * (cell + 10), top))
        ids = tokens[index].tolist()
        masked_positions = set(plans[index][3].tolist())
        masked_words = " ".join("[MASK]" if i in masked_positions else text_of([t]) for i, t in enumerate(ids))
        filled = [token_guess.get(offset + i, t) if i in masked_positions else t for i, t in enumerate(ids)]
        offset += len(ids)
        for line, text in enumerate((f"caption:   {text_of(ids)}", f"masked:    {masked_words}",
                                     f"predicted: {text_of(filled)}")):
            draw.text((10, top + cell + 4 + 18 * line), text[:110], fill="black")
    with fsspec.open(out, "wb") as handle:
        sheet.save(handle, format="PNG")
    return {"out": out, "samples": len(rows)}
