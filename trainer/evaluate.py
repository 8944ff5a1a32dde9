"""`mmae eval probe`: MAE's linear-probe protocol on frozen features.

    mmae eval probe --checkpoint RUN/checkpoints/step-0001500.pt --data build/demo/shards [--json]

Features are the CLS token of an unmasked, image-only forward (or the mean of the patch
tokens with `--pool mean`) of each labelled image's deterministic centre view; with
`--features text`, of a text-only forward of each labelled row's caption or text instead. The
probe is BatchNorm without affine + a linear layer (MAE's protocol), trained with AdamW on the
features. The split is deterministic by id (80/20), or the dataset's own `split` column when it
has one; with `--test-data`, every labelled row of `--data` trains the probe and every labelled
row of the second dataset tests it (ImageNet's train/val: the test images need never have been
pretrained on). Prints top-1 accuracy (`--json`: {"top1", "n_train", "n_test", "classes"}).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional

import fsspec
import torch
from mmae.schemas.config import MaskingConfig
from mmae.schemas.manifest import read_manifest
from .batch import Inputs
from .load import check_matches, load_model
from .streams import DataError, reading_shard
from mmae.pipelines.outputs import OutputError, check_output
from .transforms import eval_view

log = logging.getLogger("mmae.eval")


FEATURES = ("image", "text")


def labelled_rows(dataset: str, features: str = "image") -> list[dict[str, Any]]:
    """id, image bytes (or tokens), label (and split) of every row that has both an image (a
    caption or text, for `features="text"`) and a label."""
    rows = []
    value = "image" if features == "image" else "tokens"
    kinds = ("paired", "image") if features == "image" else ("paired", "text")
    for entry in read_manifest(dataset).entries(*kinds):
        url = f"{dataset.rstrip('/')}/{entry.path}"
        with reading_shard(url) as parquet:
            columns = [c for c in ("id", value, "label", "split") if c in parquet.schema_arrow.names]
            for row in parquet.read(columns=columns).to_pylist():
                if row.get("label") is not None and row.get(value):
                    rows.append(row)
    if features == "text":
        if not rows:
            raise DataError(f"{dataset}: no rows with both a caption/text and a label (build with a label_column)")
        return sorted(rows, key=lambda row: row["id"])
    undecodable = [row["id"] for row in rows if not _decodes(row["image"])]
    if undecodable:
        log.warning("%d image(s) do not decode and are left out of the evaluation: %s", len(undecodable),
                    ", ".join(undecodable[:5]) + (" ..." if len(undecodable) > 5 else ""))
        left_out = set(undecodable)
        rows = [row for row in rows if row["id"] not in left_out]
    if not rows:
        raise DataError(f"{dataset}: no rows with both an image and a label (build with a label_column)")
    return sorted(rows, key=lambda row: row["id"])


def _decodes(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 - whatever Pillow raises on bytes that are not a whole image
        return False


def split_of(row: dict[str, Any]) -> str:
    if row.get("split") in ("train", "test"):
        return row["split"]
    bucket = int.from_bytes(hashlib.blake2b(row["id"].encode(), digest_size=4).digest(), "little") % 100
    return "test" if bucket < 20 else "train"


@torch.no_grad()
def features(model, rows: list[dict[str, Any]], pool: str, batch_size: int = 256, of: str = "image") -> torch.Tensor:
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if of == "text":
            out.append(model.encode_texts([torch.tensor(row["tokens"]) for row in chunk], pool=pool))
        else:
            out.append(model.encode_images(torch.stack([eval_view(row["image"], model.image_size) for row in chunk]),
                                           pool=pool))
    return torch.cat(out).float()


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


def probe(checkpoint: str, dataset: str, pool: str = "cls", epochs: int = 100, seed: int = 0,
          allow_mismatch: bool = False, test_data: Optional[str] = None, of: str = "image") -> dict[str, Any]:
    """Top-1 of a linear probe on frozen `of` ("image" or "text") features; `test_data`: a
    second dataset whose labelled rows are the test side (all of `dataset`'s then train)."""
    if of not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, not {of!r}")
    model, state = load_model(checkpoint)
    for data in (dataset, test_data) if test_data else (dataset,):
        check_matches(state, str(checkpoint), data, tokens=of == "text", allow=allow_mismatch)
    rows = labelled_rows(dataset, of)
    if test_data:
        train_rows, test_rows = rows, labelled_rows(test_data, of)
        unseen = sorted({row["label"] for row in test_rows} - {row["label"] for row in train_rows})
        if unseen:
            raise DataError(f"{test_data}: label(s) {', '.join(map(repr, unseen[:5]))} never occur in {dataset}, "
                            "so the probe cannot learn them")
    else:
        train_rows = [row for row in rows if split_of(row) == "train"]
        test_rows = [row for row in rows if split_of(row) == "test"]
    if not train_rows or not test_rows:
        raise DataError(f"{dataset}: the split left {len(train_rows)} train and {len(test_rows)} test rows")
    names = sorted({row["label"] for row in train_rows})
    index = {name: number for number, name in enumerate(names)}
    train_x, test_x = features(model, train_rows, pool, of=of), features(model, test_rows, pool, of=of)
    train_y = torch.tensor([index[row["label"]] for row in train_rows])
    test_y = torch.tensor([index[row["label"]] for row in test_rows])
    top1 = linear_probe(train_x, train_y, test_x, test_y, len(names), epochs=epochs, seed=seed)
    return {"top1": top1, "n_train": len(train_rows), "n_test": len(test_rows), "classes": len(names)}


def paired_rows(dataset: str, limit: int, split: str = "test", holdout: float = 0.0) -> list[dict[str, Any]]:
    """Paired rows with a caption (id, image, tokens, image_sha256), sorted by id; `split`: the
    deterministic test split (as the probe's), or "all"; `holdout`: instead, the rows a run with
    `train.validation.holdout` of that fraction never trained on."""
    from .streams import held_out

    rows = []
    for entry in read_manifest(dataset).entries("paired"):
        url = f"{dataset.rstrip('/')}/{entry.path}"
        with reading_shard(url) as parquet:
            columns = [c for c in ("id", "image", "tokens", "image_sha256", "split") if c in parquet.schema_arrow.names]
            rows += [row for row in parquet.read(columns=columns).to_pylist()
                     if row["tokens"] and (held_out(row["id"], holdout) if holdout
                                           else split == "all" or split_of(row) == split)]
    rows.sort(key=lambda row: row["id"])
    if len(rows) < 2:
        which = f"held out by validation.holdout {holdout}" if holdout else f"in the {split} split"
        raise DataError(f"{dataset}: retrieval needs at least 2 paired rows {which} (found {len(rows)})")
    return rows[:limit]


def relevance(rows: list[dict[str, Any]]) -> torch.Tensor:
    """[N, N] bool: text j is a right answer for image i when row j has the same image (by
    sha256 of its bytes) or the same caption (token ids) as row i."""
    def groups(keys: list) -> torch.Tensor:
        index: dict = {}
        return torch.tensor([index.setdefault(key, len(index)) for key in keys])

    images = groups([row.get("image_sha256") or row["id"] for row in rows])
    texts = groups([tuple(row["tokens"]) for row in rows])
    return (images[:, None] == images[None, :]) | (texts[:, None] == texts[None, :])


@torch.no_grad()
def retrieval(checkpoint: str, dataset: str, limit: int = 1000, split: str = "test",
              holdout: float = 0.0, allow_mismatch: bool = False) -> dict[str, Any]:
    """Image->text and text->image recall@1/5 over the dataset's held-out paired rows (the probe's
    deterministic 80/20 split by id, its test side; the first `limit` by id). A retrieved row is a
    hit when it has the same image or the same caption as the query's row: duplicates and several
    captions per image do not count as misses. `holdout`: score the rows a run trained with
    `train.validation.holdout` of that fraction never saw."""
    model, state = load_model(checkpoint)
    check_matches(state, str(checkpoint), dataset, allow=allow_mismatch)
    if not model.alignment:
        raise DataError(f"{checkpoint} was trained without ITC (train.loss_weights.itc = 0): no retrieval heads")
    rows = paired_rows(dataset, limit, split, holdout)
    image_z, text_z = [], []
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        images = torch.stack([eval_view(row["image"], model.image_size) for row in chunk])
        tokens = [torch.tensor(row["tokens"][: model.max_text_tokens]) for row in chunk]
        ids = [row["id"] for row in chunk]
        image_z.append(torch.nn.functional.normalize(
            model.itc_image_proj(model.cls_features(Inputs.of_images(images, ids))), dim=-1))
        text_z.append(torch.nn.functional.normalize(
            model.itc_text_proj(model.cls_features(Inputs.of_texts(tokens, ids, like=images))), dim=-1))
    similarity = torch.cat(image_z) @ torch.cat(text_z).T  # [N images, N texts]
    relevant = relevance(rows)

    def recall(scores: torch.Tensor, k: int) -> float:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        return float(relevant.gather(1, top).any(dim=1).float().mean())

    return {"n": len(rows), "split": f"holdout {holdout}" if holdout else split,
            "image_to_text": {"r1": recall(similarity, 1), "r5": recall(similarity, 5)},
            "text_to_image": {"r1": recall(similarity.T, 1), "r5": recall(similarity.T, 5)}}


def reconstruct(checkpoint: str, dataset: str, out: str, count: int = 6, seed: int = 0,
                image_ratio: float = 0.75, text_ratio: float = 0.75, allow_mismatch: bool = False) -> dict[str, Any]:
    """A PNG grid: original | masked | reconstruction per sample, with the caption, the masked
    caption and the caption with the predicted tokens filled in written underneath."""
    from .reconstruction import load_tokenizer, render

    try:
        check_output(out, "--out", inputs=[str(checkpoint)], folders=[dataset])
    except OutputError as error:
        raise DataError(str(error)) from None
    model, state = load_model(checkpoint)
    check_matches(state, str(checkpoint), dataset, allow=allow_mismatch)
    rows = paired_rows(dataset, count, split="all")
    images = torch.stack([eval_view(row["image"], model.image_size) for row in rows])
    tokens = [torch.tensor(row["tokens"][: model.max_text_tokens]) for row in rows]
    inputs = Inputs(images, torch.arange(len(rows)), torch.cat(tokens), torch.tensor([len(t) for t in tokens]),
                    [row["id"] for row in rows])
    layout = model.layout(inputs, MaskingConfig(image_ratio=image_ratio, text_ratio=text_ratio), seed)
    sheet = render(model, inputs, layout, limit=len(rows), tokenizer=load_tokenizer(dataset))
    with fsspec.open(out, "wb") as handle:
        sheet.save(handle, format="PNG")
    return {"out": out, "samples": len(rows)}
