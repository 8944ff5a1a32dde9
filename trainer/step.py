"""One optimizer step: forward and backward over a step's passes, gradient clipping, and an
AdamW update that a non-finite loss or gradient skips on the device.

Nothing here reads a device value: sizes and loss normalisers are host integers the loader's
workers computed, losses accumulate on the device, and `StepResult.read()` (step_stats) brings
the figures to the host on the steps that are logged.
"""

from __future__ import annotations

import contextlib

import torch
from .batch import KINDS, Batch
from .objectives import LOSS_NAMES
from .parallel import agree_any, sum_over_ranks
from .step_inputs import Part
from .step_stats import StepResult, sample_digest

MASKED = ("image", "paired_text", "unpaired_text")


class OptimizerStep:
    def __init__(self, model, optimizer, scheduler, config, env, autocast, *, sharded: bool, fused: bool) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config, self.env, self.autocast = config, env, autocast
        self.sharded, self.fused = sharded, fused
        self.device = env.device

    def run(self, model: torch.nn.Module, parts: list[Part], objectives, seed: int,
            batches: list[Batch]) -> StepResult:
        """One optimizer step over the forward passes of this process's micro-batches.

        Nothing here reads a device value: sizes and loss normalisers are host integers the loader
        computed, losses accumulate on the device, and a non-finite loss or gradient skips the
        update on the device (AdamW's `found_inf`). `StepResult.read()` brings the figures of the
        global step to the host, for the steps that are logged."""
        config, env = self.config, self.env
        # Normalise by the masked elements of the whole global step (all micro-batches, all
        # ranks), so the update equals one big batch's mean whatever the split.
        counts = [sum(part.layout.counts()[key] for part in parts) for key in MASKED]
        normalisers = {key: value / env.world_size for key, value in zip(MASKED, sum_over_ranks(counts, env))}

        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(LOSS_NAMES), dtype=torch.float64, device=self.device)
        for micro, part in enumerate(parts):
            sync = micro == len(parts) - 1 or env.world_size == 1
            context = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
            if self.sharded:  # FSDP: reduce-scatter gradients only after the last micro-batch
                model.set_requires_gradient_sync(sync)
            with context, self.autocast:
                losses = model(part.inputs, part.layout, weights=objectives, normalisers=normalisers, seed=seed,
                               alignment=part.alignment)
            losses.loss.backward()
            sums += torch.stack([_loss_value(losses, name, len(parts)) for name in LOSS_NAMES])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   config.optimizer.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        # A NaN/inf loss or gradient must never reach the weights: every rank decides the same
        # (the gradients are all-reduced, so every rank's norm is the same; the loss is reduced too).
        nonfinite = ~(torch.isfinite(sums[0]) & torch.isfinite(grad_norm))
        if env.world_size > 1:
            nonfinite = agree_any(nonfinite, env)
        self._optimizer_step(nonfinite)
        self.scheduler.step()
        return StepResult(sums=sums, grad_norm=grad_norm.detach(), nonfinite=nonfinite,
                          seen=[sum(batch.counts()[kind] for batch in batches) for kind in KINDS],
                          skipped=sum(batch.dropped for batch in batches),
                          encoder_tokens=sum(part.layout.encoder_tokens for part in parts),
                          digest=sum(batch.digest if batch.digest is not None else sample_digest([batch.ids])
                                     for batch in batches))

    def _optimizer_step(self, nonfinite: torch.Tensor) -> None:
        """AdamW's step, or none where `nonfinite` (a device flag) is set, without reading the flag.
        Fused AdamW skips on the device (the `found_inf` of mixed precision); the FSDP path
        (DTensor parameters) reads the flag: one synchronisation per step, documented."""
        if self.fused:
            self.optimizer.found_inf = nonfinite.to(torch.float32)
            self.optimizer.grad_scale = None
            self.optimizer.step()
            return
        if bool(nonfinite):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()


def _loss_value(losses, name: str, parts: int) -> torch.Tensor:
    """A loss of one forward as a float64 device scalar (ITC/ITM: averaged over the parts)."""
    value = getattr(losses, name)
    if value is None:
        return torch.zeros((), dtype=torch.float64, device=losses.loss.device)
    value = value.detach().to(torch.float64)
    return value / parts if name in ("itc_loss", "itm_loss") else value
