"""Where a run starts: which checkpoint it resumes from, whether that checkpoint may be resumed
with this config, how many data ranks it keeps, or which weights a new run starts from.

- `train.resume_from: CKPT` (a file, a `last` pointer or a run folder), else the run folder's
  newest readable checkpoint (`last` first); checkpoints that exist and none loads stop the run.
- Settings that may not change on resume (trainer.settings) are named when they differ.
- Elastic resume: a run keeps the data ranks of its first start; fewer processes each stand for
  several, `grad_accum` making up the difference so the global batch stays the same.
- `train.init_from: CKPT`: a new run from those model weights (fresh optimizer, schedule, data).
"""

from __future__ import annotations

from typing import Any, Optional

from mmae.schemas.config import TrainConfig
from .checkpoint import Checkpointer, NoReadableCheckpoint, load_checkpoint, resolve_checkpoint
from .load import Mismatch, check_matches, exported_folder, load_model
from .settings import differences


class ResumeError(RuntimeError):
    """The run cannot continue from what it found; the message says why and what to do."""


def _load(key: str, given: str) -> tuple[str, dict[str, Any]]:
    try:
        if key == "init_from" and exported_folder(given):  # `mmae export --format safetensors` output
            return given, load_model(given)[1]
        path = resolve_checkpoint(given)
        return path, load_checkpoint(path)
    except Exception as error:  # noqa: BLE001 - say which file and why
        raise ResumeError(f"train.{key} {given}: cannot load ({type(error).__name__}: {error})") from None


def checkpoint_to_resume(config: TrainConfig, checkpoints: Checkpointer) -> Optional[tuple[str, dict[str, Any]]]:
    if config.resume_from:
        return _load("resume_from", config.resume_from)
    try:
        return checkpoints.load_latest()
    except NoReadableCheckpoint as error:
        raise ResumeError(str(error)) from None


def changes_allowed(path: str, state: dict[str, Any], config: TrainConfig, model_spec: dict) -> dict[str, list]:
    """The settings that changed and may change; stops naming those that may not."""
    allowed, refused = differences(state.get("config", {}), config.model_dump(mode="json"))
    if refused:
        listed = "; ".join(f"train.{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise ResumeError(f"{path} was trained with other settings that may not change on resume ({listed}); "
                          "restore them, or start a new run with another train.out")
    if state["model_spec"] != model_spec:
        raise ResumeError(f"{path} holds another model than this config builds: {spec_difference(state['model_spec'], model_spec)}")
    return allowed


def data_ranks(path: str, state: dict[str, Any], config: TrainConfig, processes: int) -> int:
    """The data ranks the checkpoint's run started with, checked against this run's processes."""
    data_world = state["loader"]["world_size"]
    saved_accum = state.get("config", {}).get("grad_accum", config.grad_accum)
    if data_world % processes:
        raise ResumeError(f"{path} was trained on {data_world} data ranks; {processes} processes cannot share them "
                          f"evenly: resume on a divisor of {data_world} processes")
    needed = saved_accum * data_world // processes
    if config.grad_accum != needed:
        raise ResumeError(f"{path} was trained with {data_world} process(es) x train.grad_accum {saved_accum}; on "
                          f"{processes} process(es) set train.grad_accum={needed} to keep the same global batch")
    return data_world


def initial_weights(config: TrainConfig, model_spec: dict) -> tuple[str, dict[str, Any]]:
    """train.init_from's checkpoint, checked to hold this config's model."""
    path, state = _load("init_from", config.init_from)
    if state["model_spec"] != model_spec:
        raise ResumeError(f"train.init_from {path} holds another model than this config builds: "
                          f"{spec_difference(state['model_spec'], model_spec)}")
    if config.use_text:
        for dataset in config.data_paths:
            try:
                check_matches(state, f"train.init_from {path}", dataset, images=False, allow=config.allow_mismatch,
                              flag="train.allow_mismatch: true")
            except Mismatch as error:
                raise ResumeError(str(error)) from None
    return path, state


SPEC_WORDS = {"vocab_size": "vocabulary (the dataset's tokenizer)", "image_size": "image size (train.image_size)",
              "max_text_tokens": "text length (train.max_text_tokens)", "preset": "preset (train.model.preset)",
              "norm_pix_loss": "pixel targets (train.model.norm_pix_loss)",
              "patch_size": "patch size (train.model.patch_size)",
              "alignment": "ITC/ITM heads (train.loss_weights.itc/itm)"}


def spec_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """What differs between two model specs, in words: `vocabulary ...: 4000 there, 1000 here`."""
    keys = [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    return "; ".join(f"{SPEC_WORDS.get(key, key)}: {saved.get(key)!r} there, {current.get(key)!r} here"
                     for key in keys) or "the specs differ"
