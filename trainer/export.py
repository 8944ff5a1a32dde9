"""`mmae export`: a checkpoint's model in the formats other tools load.

    mmae export --checkpoint RUN --format timm --out vit/          # timm.create_model("local-dir:vit/", pretrained=True)
    mmae export --checkpoint RUN --format safetensors --out m3ae/  # the whole model: mmae.api.load_model("m3ae/")

`timm`: the image encoder as timm's VisionTransformer (`config.json` + `model.safetensors`):
mmae's Linear patch embedding becomes the Conv2d `patch_embed.proj`, the fixed sin-cos
positions and the image type embedding fold into `pos_embed`, the CLS type embedding into
`cls_token`; `forward_features(x)[:, 0]` is mmae's image CLS feature (`encode_images`).
Only the image path leaves: text embeddings, the decoder and the heads stay in mmae's format.

`safetensors`: every tensor of the model (encoder, decoder, heads, alignment heads) under
mmae's names in `model.safetensors`, `mmae.json` (the model spec, the training config, the
step), and the dataset's `tokenizer.model` when it can be read: enough for reconstruction,
embedding and continued training (`train.init_from` takes the folder).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import torch
from .checkpoint import resolve_checkpoint
from .load import EXPORTED_CONFIG, EXPORTED_WEIGHTS, Mismatch, check_matches, load_model, trained_on
from mmae.pipelines.outputs import OutputError, check_output
from .model import CLS, IMAGE, MultimodalMAE
from .transforms import MEAN, STD

log = logging.getLogger("mmae.export")

FORMATS = ("timm", "safetensors")
SAFETENSORS_FILE = EXPORTED_WEIGHTS
MMAE_CONFIG = EXPORTED_CONFIG


class ExportError(RuntimeError):
    """The export cannot be written; the message says why."""


def timm_state_dict(model: MultimodalMAE) -> dict[str, torch.Tensor]:
    """The image encoder under timm VisionTransformer's names and shapes."""
    state = model.state_dict()
    p, dim = model.patch_size, model.size.dim
    out: dict[str, torch.Tensor] = {
        # Linear over patches flattened as (row, column, channel) -> Conv2d [D, C, p, p].
        "patch_embed.proj.weight": state["patch_embed.weight"].reshape(dim, p, p, 3).permute(0, 3, 1, 2),
        "patch_embed.proj.bias": state["patch_embed.bias"],
        "cls_token": (state["cls_token"] + state["type_embed.weight"][CLS]).reshape(1, 1, dim),
        "pos_embed": torch.cat([torch.zeros(1, dim), model.image_pos + state["type_embed.weight"][IMAGE]])[None],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    for index in range(model.size.depth):
        ours, theirs = f"blocks.{index}.", f"blocks.{index}."
        for name, target in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                             ("norm2", "norm2"), ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"{theirs}{target}.{kind}"] = state[f"{ours}{name}.{kind}"]
    return {key: value.detach().float().contiguous().clone() for key, value in out.items()}


def timm_config(model: MultimodalMAE) -> dict[str, Any]:
    size = model.size
    return {
        # A registered timm entrypoint; model_args override its sizes.
        "architecture": "vit_base_patch16_224",
        "num_classes": 0,
        "num_features": size.dim,
        "global_pool": "token",
        "model_args": {"img_size": model.image_size, "patch_size": model.patch_size, "embed_dim": size.dim,
                       "depth": size.depth, "num_heads": size.heads, "mlp_ratio": size.mlp_ratio,
                       "qkv_bias": True, "class_token": True, "global_pool": "token", "num_classes": 0},
        "pretrained_cfg": {"input_size": [3, model.image_size, model.image_size], "crop_pct": 1.0,
                           "crop_mode": "center", "interpolation": "bicubic",
                           "mean": MEAN.flatten().tolist(), "std": STD.flatten().tolist(),
                           "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
                           "classifier": "head", "license": "see the training data",
                           "tag": "mmae", "description": "mmae image encoder (CLS token = mmae encode_images)"},
    }


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def _prepare(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"{out} is a file; --out names the folder to write")
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    os.makedirs(out, exist_ok=True)


def export(checkpoint: str, out: str, format: str = "timm", overwrite: bool = False,
           tokenizer_from: Optional[str] = None, allow_mismatch: bool = False) -> dict[str, Any]:
    if format not in FORMATS:
        raise ExportError(f"unknown --format {format!r} (choose from {', '.join(FORMATS)})")
    path = resolve_checkpoint(checkpoint)
    model, state = load_model(path)
    dataset = tokenizer_from or next(iter(trained_on(state)), None)
    try:
        check_output(out, "--out", inputs=[str(path)], folders=[dataset or ""])
        if tokenizer_from and format == "safetensors":  # another dataset's tokenizer goes with this model
            check_matches(state, str(path), tokenizer_from, images=False, allow=allow_mismatch)
    except (OutputError, Mismatch) as error:
        raise ExportError(str(error)) from None
    _prepare(out, overwrite)
    written = []
    if format == "timm":
        _save_safetensors(timm_state_dict(model), os.path.join(out, SAFETENSORS_FILE), {"format": "pt"})
        with open(os.path.join(out, "config.json"), "w") as handle:
            json.dump(timm_config(model), handle, indent=2)
        written = ["config.json", SAFETENSORS_FILE]
    else:
        tensors = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
        _save_safetensors(tensors, os.path.join(out, SAFETENSORS_FILE), {"format": "pt", "producer": "mmae"})
        config = state.get("config") or {}
        with open(os.path.join(out, MMAE_CONFIG), "w") as handle:
            json.dump({"model_spec": state["model_spec"], "step": state.get("step"), "train": config,
                       "tokenizer": state.get("tokenizer"), "data_image_sizes": state.get("data_image_sizes"),
                       "source": str(path)}, handle, indent=2)
        written = [SAFETENSORS_FILE, MMAE_CONFIG]
        if dataset:
            copied = _copy_tokenizer(dataset, os.path.join(out, "tokenizer.model"))
            written += ["tokenizer.model"] if copied else []
    return {"out": out, "format": format, "checkpoint": str(path), "files": written,
            "parameters": sum(value.numel() for value in model.state_dict().values())}


def _copy_tokenizer(dataset: str, target: str) -> bool:
    import fsspec
    from mmae.schemas.manifest import ManifestError, read_manifest

    try:
        entry = read_manifest(dataset).tokenizer
        if entry is None:
            return False
        with fsspec.open(f"{dataset.rstrip('/')}/{entry.path}", "rb") as handle, open(target, "wb") as copy:
            copy.write(handle.read())
        return True
    except (ManifestError, OSError) as error:
        log.warning("no tokenizer copied from %s (%s); text embedding will need the dataset's tokenizer.model",
                    dataset, error)
        return False
