"""The one way to a model for evaluation and use: `load_model(path)` takes a checkpoint file, a
`last` pointer, a run folder or a folder written by `mmae export --format safetensors`, rebuilds
the model from its `ModelSpec` once the weights' shapes agree with it (checked on the meta
device, before anything is allocated) and refuses weights that are not finite. `check_matches`
says whether a dataset belongs with a model (its tokenizer, its stored image size).

Used by eval, embed, export, `train.init_from` and `mmae.api.load`; above `checkpoint`
(saving, resolving, loading state) and below `export`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from .checkpoint import CheckpointNotFound, check_finite, load_checkpoint, resolve_checkpoint
from .model import ModelSpec

log = logging.getLogger("mmae.checkpoint")


def exported_folder(given: str) -> bool:
    """A folder written by `mmae export --format safetensors` (weights, spec, tokenizer)."""
    import os

    return os.path.isdir(str(given)) and os.path.isfile(os.path.join(str(given), "mmae.json"))


EXPORTED_CONFIG = "mmae.json"
EXPORTED_WEIGHTS = "model.safetensors"


def build_checked(spec: Any, shapes: dict[str, tuple[int, ...]], where: str):
    """The model a spec describes, built only once the spec is whole and its tensors' shapes
    agree with `shapes` (what the file holds): a spec claiming a vocabulary of 10^8 is refused
    before anything is allocated (the comparison is made on the meta device)."""
    try:
        model_spec = ModelSpec.from_dict(spec)
        with torch.device("meta"):
            expected = {name: tuple(value.shape) for name, value in model_spec.build().state_dict().items()}
    except (ValueError, RuntimeError) as error:
        raise CheckpointNotFound(f"{where}: the model spec cannot be used ({error})") from None
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = [name for name in expected if name in shapes and tuple(shapes[name]) != expected[name]]
    if missing or extra or wrong:
        detail = (f"{wrong[0]} is {tuple(shapes[wrong[0]])} in the file, {expected[wrong[0]]} for the spec" if wrong
                  else f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}")
        raise CheckpointNotFound(f"{where}: the weights do not match the model spec ({detail})")
    return model_spec.build()


def load_exported(folder: str):
    """A model from a `mmae export --format safetensors` folder (weights, spec, config)."""
    import json
    import os

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    config_path = os.path.join(folder, EXPORTED_CONFIG)
    weights_path = os.path.join(folder, EXPORTED_WEIGHTS)
    try:
        with open(config_path, "rb") as handle:
            meta = json.loads(handle.read(1 << 20))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointNotFound(f"{config_path}: not readable as the export's JSON ({type(error).__name__}: "
                                 f"{str(error)[:200]})") from None
    try:
        with safe_open(weights_path, framework="pt") as weights:
            shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
        model = build_checked(meta.get("model_spec"), shapes, weights_path)
        tensors = load_file(weights_path)
    except (OSError, SafetensorError) as error:
        raise CheckpointNotFound(f"{weights_path}: cannot be read ({type(error).__name__}: {error})") from None
    check_finite(tensors, weights_path)
    model.load_state_dict(tensors)
    model.eval()
    return model, {"model": model.state_dict(), "model_spec": meta["model_spec"], "step": meta.get("step"),
                   "config": meta.get("train") if isinstance(meta.get("train"), dict) else {},
                   "tokenizer": meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else None,
                   "data_image_sizes": meta.get("data_image_sizes") if isinstance(meta.get("data_image_sizes"), list)
                   else None}


def load_model(path: str):
    """A model from a checkpoint, for evaluation (weights_only=True; no code runs on load), its
    weights checked: a spec that disagrees with them, or NaN/inf among them, is refused naming the
    file. `path` may be a checkpoint file, a `last` pointer, a run folder (`resolve_checkpoint`)
    or a folder exported with `--format safetensors`."""
    if exported_folder(path):
        return load_exported(str(path))
    path = resolve_checkpoint(path)
    try:
        state = load_checkpoint(path)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file: say which
        raise CheckpointNotFound(f"{path}: cannot be loaded as a checkpoint ({type(error).__name__}: "
                                 f"{str(error)[:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "model_spec" not in state:
        raise CheckpointNotFound(f"{path}: not an mmae checkpoint (no model weights and spec in it)")
    shapes = {name: tuple(value.shape) for name, value in state["model"].items() if isinstance(value, torch.Tensor)}
    model = build_checked(state["model_spec"], shapes, path)
    check_finite(state["model"], path)
    model.load_state_dict(state["model"])
    model.eval()
    return model, state


# -- what a model was trained on -----------------------------------------------------------


class Mismatch(ValueError):
    """A checkpoint and a dataset that do not belong together (tokenizer, image size)."""


def trained_on(state: dict[str, Any]) -> list[str]:
    """The datasets of the run that wrote `state` (train.data: a path or a list of them)."""
    data = (state.get("config") or {}).get("data")
    items = data if isinstance(data, list) else [data] if data else []
    return [item if isinstance(item, str) else item.get("path") for item in items
            if isinstance(item, str) or (isinstance(item, dict) and isinstance(item.get("path"), str))]


def stored_image_size(manifest) -> Optional[int]:
    """The side of the images a build stored (its data.image.size), when its manifest says and the
    build resized to it (`resize_mode: no` keeps every image's own size: nothing to compare)."""
    image = (manifest.config.get("image") or {}) if isinstance(manifest.config, dict) else {}
    size = image.get("size") if isinstance(image, dict) and image.get("resize_mode") != "no" else None
    return size if isinstance(size, int) else None


def check_matches(state: dict[str, Any], where: str, dataset: str, *, tokens: bool = True, images: bool = True,
                  allow: bool = False, flag: str = "--allow-mismatch") -> None:
    """Refuse (Mismatch) a dataset whose tokenizer or stored image size is not the checkpoint's:
    token ids that mean other words give plausible-looking garbage. `allow`: log it and go on."""
    from mmae.schemas.manifest import read_manifest

    manifest = read_manifest(dataset)
    problems = []
    spec = state.get("model_spec") or {}
    mine = manifest.tokenizer
    saved = state.get("tokenizer")
    if tokens and mine is not None:
        if isinstance(saved, dict) and saved.get("sha256") and saved["sha256"] != mine.sha256:
            problems.append(f"its tokenizer ({str(saved['sha256'])[:12]}) is not {dataset}'s ({mine.sha256[:12]})")
        elif not isinstance(saved, dict) and spec.get("vocab_size") not in (None, mine.vocab_size, 8):
            problems.append(f"its vocabulary has {spec['vocab_size']} tokens, {dataset}'s tokenizer "
                            f"{mine.vocab_size}")
    stored = stored_image_size(manifest)
    sizes = state.get("data_image_sizes")  # what the run trained on (its model may see crops of another size)
    if images and stored and isinstance(sizes, list) and sizes and stored not in sizes:
        problems.append(f"it was trained on {'/'.join(str(size) for size in sizes)}px images, {dataset} holds "
                        f"{stored}px ones")
    if not problems:
        return
    message = f"{where} does not belong with {dataset}: {'; '.join(problems)}"
    if allow:
        log.warning("%s (%s given: going on)", message, flag)
        return
    raise Mismatch(f"{message}. Use the dataset the run was trained on"
                   f"{' (' + ', '.join(trained_on(state)) + ')' if trained_on(state) else ''}, or pass {flag} "
                   "if this is what you mean")
