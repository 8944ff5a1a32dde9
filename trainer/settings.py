"""Which settings may change when a run resumes, and what a change means.

A checkpoint holds weights, optimizer moments, the data position and the schedule of one
configuration. Settings that decide what those mean (the model, the data and how it is batched,
masking, the seed, the recipe) may not change on resume: the run stops naming each one that
differs. The others may, with these meanings, and each change is appended to
`RUN/config-history.jsonl` (step, old and new value) while `config.yaml` shows what runs now:

- `steps`, `optimizer.warmup_steps`, `optimizer.min_lr`, `optimizer.base_lr`, `optimizer.lr`:
  the learning-rate schedule is recomputed for the new values and continues from the current
  step (more steps stretch the cosine to the new end; the lr may jump at the resume step);
- `optimizer.grad_clip`, `on_nonfinite`, `max_skipped_steps`, `data_errors`: apply from the
  next step;
- `grad_accum`: only together with a different number of processes, so that processes x
  grad_accum stays what it was (an elastic resume: `RankLoaders` keeps the data ranks);
- intervals and plumbing (`log_every`, `checkpoint_every`, `keep_checkpoints`, `tensorboard`,
  `num_workers`, `prefetch_factor`, `compile`, `attention`, `out`, `validation.data`,
  `validation.every`, `validation.batches`): change nothing trained. `validation.holdout` may not
  change: it decides which rows are trained on.
"""

from __future__ import annotations

from typing import Any

CHANGEABLE = frozenset({
    "steps", "optimizer.warmup_steps", "optimizer.min_lr", "optimizer.base_lr", "optimizer.lr",
    "optimizer.grad_clip", "on_nonfinite", "max_skipped_steps", "data_errors",
    "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard", "num_workers", "prefetch_factor",
    "compile", "attention", "out", "resume_from", "init_from", "allow_mismatch",
    "validation.data", "validation.every", "validation.batches",  # what is measured, not what is trained
    "grad_accum",  # only with a different number of processes, keeping the global batch (checked on resume)
})


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[dict[str, list], dict[str, list]]:
    """(changes that are allowed, changes that are not): dotted key -> [saved, current]."""
    old, new = flatten(saved), flatten(current)
    allowed: dict[str, list] = {}
    refused: dict[str, list] = {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
            before, after = list(before), list(after)
        if before != after:
            (allowed if key in CHANGEABLE else refused)[key] = [before, after]
    return allowed, refused
