"""Optimizer and learning-rate schedule: AdamW with MAE's weight-decay rule, warmup then cosine.

lr = `optimizer.lr`, or `optimizer.base_lr * global batch / 256` (MAE's scaling rule).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from mmae.schemas.config import TrainConfig

log = logging.getLogger("mmae.train")

NO_DECAY_NAMES = ("token_embed", "type_embed", "decoder_type_embed", "cls_token", "image_mask_token",
                  "text_mask_token")


class WarmupCosine:
    """lr multiplier: linear warmup, then cosine to min_lr (a class, so its state pickles plainly)."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases, embeddings and special tokens (MAE's rule)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.split(".")[0] in NO_DECAY_NAMES:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(config: TrainConfig, world_size: int) -> float:
    global_batch = config.batch_size * world_size * config.grad_accum
    return config.optimizer.lr or config.optimizer.base_lr * global_batch / 256


def build_optimizer(model: torch.nn.Module, config: TrainConfig, lr: float, warn: bool = True, fused: bool = False):
    """(AdamW, LambdaLR) for this config. `fused`: the single-kernel AdamW, which can skip a step on
    the device (`found_inf`, as mixed precision uses it) without the host reading a flag."""
    settings = config.optimizer
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=lr, betas=tuple(settings.betas),
                                  fused=fused or None)
    if settings.warmup_steps >= config.steps and warn:
        log.warning("train.optimizer.warmup_steps (%d) covers the whole run (train.steps %d): the learning "
                    "rate never reaches its peak and never decays", settings.warmup_steps, config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(settings.warmup_steps, config.steps, settings.min_lr / lr))
    return optimizer, scheduler


def apply_schedule(optimizer, scheduler, config: TrainConfig, lr: float) -> None:
    """This config's schedule from the scheduler's current step on (a checkpoint holds its own):
    after a resume that changed steps, warmup, min_lr or the lr."""
    settings = config.optimizer
    for schedule in scheduler.lr_lambdas:
        schedule.warmup, schedule.total, schedule.min_ratio = settings.warmup_steps, config.steps, settings.min_lr / lr
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * schedule(scheduler.last_epoch)
