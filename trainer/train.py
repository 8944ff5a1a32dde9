"""`mmae train`: the M3AE training loop.

    mmae train --config pipeline.yaml                       # one process (resumes RUN/ if it has checkpoints)
    mmae train --config pipeline.yaml --nproc 2             # DDP via torchrun (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node=8 -m trainer --config pipeline.yaml --set train.model.preset=base

The loop reads `while step < steps: train_step(); maybe_checkpoint(); maybe_log()`. Model
code is single-device; DDP is applied by `parallelize()`. Restarting the same command resumes
from the last good checkpoint; on CPU the resumed run reproduces the uninterrupted run's
losses bit for bit (data order, masks and augmentations are functions of seed and step).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml

from schemas.config import Config, TrainConfig
from trainer.attention import resolve_backend
from trainer.checkpoint import Checkpointer, NoReadableCheckpoint, load_checkpoint, resolve_checkpoint
from trainer.settings import differences
from trainer.data import RankLoaders, Batch, MixedLoader, read_manifest
from trainer.model import Inputs, MultimodalMAE, build_model, count_parameters

log = logging.getLogger("mmae.train")

NO_DECAY_NAMES = ("token_embed", "type_embed", "decoder_type_embed", "cls_token", "image_mask_token",
                  "text_mask_token")


class Preempted(Exception):
    """SIGTERM or SIGINT arrived: the current step finished, a checkpoint was saved."""

    def __init__(self, signum: int, step: int, path: Optional[Path]) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; saved {path}; run the same command to resume")
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT: what a shell reports


class TrainError(RuntimeError):
    """The run cannot start; the message says why."""


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # before the process group, so NCCL binds the right GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


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


def shard_model(model: MultimodalMAE) -> None:
    """FSDP2 in place: every encoder and decoder block is its own unit (gathered just before it
    runs, freed after), the embeddings, heads and norms form the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in [*model.blocks, *model.decoder_blocks]:
        fully_shard(block)
    fully_shard(model)


def parallelize(model: MultimodalMAE, env: Distributed, config: TrainConfig) -> torch.nn.Module:
    """DDP (and optionally torch.compile) around single-device model code; an FSDP model
    (sharded by `shard_model` when the trainer was built) is returned as it is."""
    wrapped: torch.nn.Module = model
    if config.compile:
        # The blocks hold nearly all FLOPs and have regular shapes; the masking and packing code
        # around them is index bookkeeping that would only cause graph breaks.
        for block in [*model.blocks, *model.decoder_blocks]:
            block.compile(dynamic=True)
    if env.world_size > 1 and config.parallel == "ddp":
        device_ids = [env.local_rank] if torch.cuda.is_available() else None
        # Some parameters sit idle in some steps when a kind is absent (a zero share, a stage, MAE).
        missing_kind = min(config.mix.shares().values()) == 0 or not config.use_text or bool(config.stages)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=device_ids, find_unused_parameters=missing_kind)
    return wrapped


def inputs_of(batch: Batch) -> Inputs:
    return Inputs(batch.images, batch.image_index, batch.tokens, batch.token_lengths, batch.ids)


def masked_counts(inputs: Inputs, plans) -> dict[str, int]:
    counts = {"image": 0, "paired_text": 0, "unpaired_text": 0}
    for index, (_, image_masked, _, text_masked) in enumerate(plans):
        has_image = int(inputs.image_index[index]) >= 0
        counts["image"] += len(image_masked)
        counts["paired_text" if has_image else "unpaired_text"] += len(text_masked)
    return counts


def masking_ratios(inputs: Inputs, masking) -> tuple[list[float], list[float]]:
    """Per-sample (image, text) mask ratios. `cross` (MaskVLM): a paired sample masks its image
    and keeps the caption whole, or the other way round, alternating by a hash of its id."""
    image_ratios, text_ratios = [], []
    for index, sample_id in enumerate(inputs.ids):
        paired = int(inputs.image_index[index]) >= 0 and int(inputs.token_lengths[index]) > 0
        if masking.strategy == "cross" and paired:
            mask_image = int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=2).digest(), "little") % 2 == 0
            image_ratios.append(masking.image_ratio if mask_image else 0.0)
            text_ratios.append(0.0 if mask_image else masking.text_ratio)
        else:
            image_ratios.append(masking.image_ratio)
            text_ratios.append(masking.text_ratio)
    return image_ratios, text_ratios


DIGEST_MODULUS = 1 << 40  # per-rank digests summed over ranks stay exact in float64


def sample_digest(batches: list[Batch]) -> int:
    """Which samples a step read, whatever their order or split over ranks and micro-batches:
    a sum of 40-bit id hashes (the global step's is the all-reduced sum)."""
    total = sum(int.from_bytes(hashlib.blake2b(sample.encode(), digest_size=5).digest(), "big")
                for batch in batches for sample in batch.ids)
    return total % DIGEST_MODULUS


def step_seed(seed: int, step: int) -> int:
    """Masks are drawn per sample id from this seed: the same whatever the micro-batch or rank split."""
    return seed * 1_000_003 + step


class Trainer:
    def __init__(self, config: TrainConfig, env: Distributed) -> None:
        self.config, self.env = config, env
        self.device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
        manifest = read_manifest(config.data)
        tokenizer = manifest.get("tokenizer") or {}
        self.vocab_size = tokenizer.get("vocab_size") or 0
        if not self.vocab_size and config.use_text and (config.mix.paired or config.mix.text):
            raise TrainError(f"{config.data} has no tokenizer in its manifest; text needs one")
        self.model_spec = {"preset": config.model.preset, "vocab_size": max(self.vocab_size, 8),
                           "image_size": config.image_size, "max_text_tokens": config.max_text_tokens,
                           "norm_pix_loss": config.model.norm_pix_loss}
        objectives = [config.loss_weights] + [stage.objectives for stage in config.stages if stage.objectives]
        if any(weights.itc or weights.itm for weights in objectives):
            self.model_spec["alignment"] = True
        torch.manual_seed(config.seed)
        self.model = build_model(**self.model_spec).to(self.device)
        self.backend, self.layout = resolve_backend(config.attention)
        self.model.set_attention(self.backend, self.layout)
        self.sharded = config.parallel == "fsdp" and env.world_size > 1
        if self.sharded:
            shard_model(self.model)  # before the optimizer: it must hold the sharded parameters
        # Stages: (first step, end step, stage config or None for a single-stage run).
        self.stages: list[tuple[int, int, Any]] = []
        start = 0
        for stage in config.stages or [None]:
            end = start + (stage.steps if stage is not None else config.steps)
            self.stages.append((start, end, stage))
            start = end
        self.stage_index = 0
        self.data_world = env.world_size  # data ranks: the processes of the run's first start
        self.loader = self._make_loader(0)
        global_batch = config.batch_size * env.world_size * config.grad_accum
        lr = config.optimizer.lr or config.optimizer.base_lr * global_batch / 256
        self.lr = lr
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, config.optimizer.weight_decay), lr=lr,
                                           betas=tuple(config.optimizer.betas))
        schedule = WarmupCosine(config.optimizer.warmup_steps, config.steps, config.optimizer.min_lr / lr)
        if config.optimizer.warmup_steps >= config.steps and env.main:
            log.warning("train.optimizer.warmup_steps (%d) covers the whole run (train.steps %d): the learning "
                        "rate never reaches its peak and never decays", config.optimizer.warmup_steps, config.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.skipped_steps = 0  # updates not applied because the loss or gradient was not finite
        self.changed_on_resume: dict[str, list] = {}
        self.run = Path(config.out)
        self.checkpoints = Checkpointer(self.run / "checkpoints", config.keep_checkpoints)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))

    # -- stages ---------------------------------------------------------------------------

    def _make_loader(self, index: int) -> RankLoaders:
        """The loader of stage `index`: its mix (text share 0 for the MAE baseline), its own order."""
        stage = self.stages[index][2]
        mix = stage.mix if stage is not None else self.config.mix
        if not self.config.use_text:
            # MAE baseline: the same images (paired ones too, captions dropped); no text-only rows.
            mix = mix.model_copy(update={"text": 0.0})
        stage_config = self.config.model_copy(update={"mix": mix, "seed": self.config.seed + 1009 * index})
        per_process = self.data_world // self.env.world_size
        ranks = [self.env.rank * per_process + offset for offset in range(per_process)]
        return RankLoaders([MixedLoader(stage_config, rank=rank, world_size=self.data_world) for rank in ranks],
                           self.config.grad_accum // per_process)

    def stage_of(self, step: int) -> int:
        for index, (start, end, _) in enumerate(self.stages):
            if start <= step < end:
                return index
        return len(self.stages) - 1

    def _enter_stage(self, index: int) -> None:
        stage = self.stages[index][2]
        frozen = tuple(stage.frozen) if stage is not None else ()
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(not name.startswith(frozen) if frozen else True)
        if index != self.stage_index:
            self.stage_index = index
            self.loader = self._make_loader(index)
        if stage is not None and self.env.main:
            log.info("stage %d%s: steps %d-%d, %s", index, f" ({stage.name})" if stage.name else "",
                     self.stages[index][0], self.stages[index][1], self.loader.describe())

    def loss_weights(self):
        stage = self.stages[self.stage_index][2]
        weights = stage.objectives if stage is not None and stage.objectives is not None else self.config.loss_weights
        return weights

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole training state. With FSDP every rank must call it (it gathers the shards) and
        only rank 0 gets the full tensors; the saved checkpoint is the same full model either way."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=options)
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        else:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "parallel": "fsdp" if self.sharded else "replicated",
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "stage": self.stage_index,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "model_spec": self.model_spec,
            "config": self.config.model_dump(mode="json"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        written = state.get("parallel", "replicated")
        if written != ("fsdp" if self.sharded else "replicated"):
            # The optimizer state is keyed by parameter name under FSDP and by position otherwise.
            raise TrainError(f"this checkpoint was written with train.parallel: {'fsdp' if written == 'fsdp' else 'ddp'}"
                             f" over several processes; resume it the same way (its model weights load anywhere)")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("stage", 0) != self.stage_index:
            self.stage_index = state["stage"]
            self.loader = self._make_loader(self.stage_index)
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)

    def resume(self) -> Optional[Path]:
        if self.config.resume_from:
            path = Path(self.config.resume_from)
            try:
                path = resolve_checkpoint(path)
                found = (path, load_checkpoint(path))
            except Exception as error:  # noqa: BLE001 - say which file and why
                raise TrainError(f"train.resume_from {path}: cannot load ({type(error).__name__}: {error})") from None
        else:
            try:
                found = self.checkpoints.load_latest()
            except NoReadableCheckpoint as error:
                raise TrainError(str(error)) from None
        if found is None:
            if self.config.init_from:
                self._init_weights(Path(self.config.init_from))
            return None
        path, state = found
        allowed, refused = differences(state.get("config", {}), self.config.model_dump(mode="json"))
        if refused:
            listed = "; ".join(f"train.{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
            raise TrainError(f"{path} was trained with other settings that may not change on resume ({listed}); "
                             "restore them, or start a new run with another train.out")
        if state["model_spec"] != self.model_spec:
            raise TrainError(f"{path} holds a {state['model_spec']} model; this config builds {self.model_spec}")
        self._adopt_data_ranks(path, state)
        try:
            self.load_state_dict(state)
        except ValueError as error:  # the loader's own checks (world size, streams, data)
            raise TrainError(f"{path}: {error}") from None
        self._apply_schedule()
        self.changed_on_resume = allowed
        return path

    def _adopt_data_ranks(self, path: Path, state: dict[str, Any]) -> None:
        """Elastic resume: fewer processes than data ranks, the global batch kept by grad_accum."""
        data_world = state["loader"]["world_size"]
        saved_accum = state.get("config", {}).get("grad_accum", self.config.grad_accum)
        processes = self.env.world_size
        if data_world % processes:
            raise TrainError(f"{path} was trained on {data_world} data ranks; {processes} processes cannot share them "
                             f"evenly: resume on a divisor of {data_world} processes")
        needed = saved_accum * data_world // processes
        if self.config.grad_accum != needed:
            raise TrainError(f"{path} was trained with {data_world} process(es) x train.grad_accum {saved_accum}; on "
                             f"{processes} process(es) set train.grad_accum={needed} to keep the same global batch")
        if data_world != self.data_world:
            self.data_world = data_world
            self.loader = self._make_loader(self.stage_index)
            if self.env.main:
                log.info("elastic resume: %d data ranks on %d process(es), grad_accum %d", data_world, processes,
                         needed)

    def _init_weights(self, path: Path) -> None:
        """A new run from another run's weights; optimizer, schedule and data start fresh."""
        try:
            path = resolve_checkpoint(path)
            state = load_checkpoint(path)
        except Exception as error:  # noqa: BLE001
            raise TrainError(f"train.init_from {path}: cannot load ({type(error).__name__}: {error})") from None
        if state["model_spec"] != self.model_spec:
            raise TrainError(f"train.init_from {path} holds a {state['model_spec']} model; this config builds "
                             f"{self.model_spec}")
        self.model.load_state_dict(state["model"])
        log.info("initialised the model from %s (its step %d); optimizer, schedule and data start fresh",
                 path, state["step"])

    def _apply_schedule(self) -> None:
        """The schedule of this config from the current step on (a checkpoint holds its own)."""
        optimizer = self.config.optimizer
        for schedule in self.scheduler.lr_lambdas:
            schedule.warmup, schedule.total, schedule.min_ratio = optimizer.warmup_steps, self.config.steps, \
                optimizer.min_lr / self.lr
        self.scheduler.base_lrs = [self.lr for _ in self.optimizer.param_groups]
        for group, schedule in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * schedule(self.scheduler.last_epoch)

    # -- the loop -------------------------------------------------------------------------

    def train_step(self, model: torch.nn.Module, batches: list[Batch]) -> dict[str, Any]:
        config = self.config
        objectives = self.loss_weights()
        weights = (objectives.image, objectives.text, objectives.unpaired_text)
        seen = {kind: sum(batch.counts()[kind] for batch in batches) for kind in ("paired", "image", "text")}
        skipped = sum(batch.dropped for batch in batches)
        digest = sample_digest(batches)
        if not config.use_text:
            batches = [batch.without_text() for batch in batches]
        if config.step_mode == "per_kind":
            # MoMo: one forward/backward per kind, gradients summed before the single step. With
            # losses normalised by the whole step's counts this is the packed step's update.
            batches = [batch.select(indices) for batch in batches for code in range(3)
                       if (indices := (batch.kinds == code).nonzero().flatten().tolist())]
        inputs = [inputs_of(batch.to(self.device)) for batch in batches]
        plans = []
        for item in inputs:
            image_ratios, text_ratios = masking_ratios(item, config.masking)
            plans.append(self.model.random_masking(item, config.masking.image_ratio, config.masking.text_ratio,
                                                   step_seed(config.seed, self.step), image_ratios, text_ratios))
        # Normalise by the masked elements of the whole global step (all micro-batches, all
        # ranks), so the update equals one big batch's mean whatever the split.
        counts = {key: 0 for key in ("image", "paired_text", "unpaired_text")}
        for item, plan in zip(inputs, plans):
            for key, value in masked_counts(item, plan).items():
                counts[key] += value
        totals = torch.tensor([counts["image"], counts["paired_text"], counts["unpaired_text"]], dtype=torch.float64,
                              device=self.device)  # NCCL reduces device tensors only
        if self.env.world_size > 1:
            dist.all_reduce(totals)
        normalisers = {key: float(value) / self.env.world_size
                       for key, value in zip(("image", "paired_text", "unpaired_text"), totals.tolist())}
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "image_loss": 0.0, "text_loss": 0.0, "unpaired_text_loss": 0.0, "itc_loss": 0.0,
                "itm_loss": 0.0}
        encoder_tokens = 0
        for micro, (item, plan) in enumerate(zip(inputs, plans)):
            sync = micro == len(inputs) - 1 or self.env.world_size == 1
            context = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
            if self.sharded:  # FSDP: reduce-scatter gradients only after the last micro-batch
                model.set_requires_gradient_sync(sync)
            with context, self.autocast:
                output = model(item, plans=plan, weights=weights, normalisers=normalisers,
                               alignment=(objectives.itc, objectives.itm), seed=step_seed(config.seed, self.step))
            output.loss.backward()
            sums["loss"] += float(output.loss.detach())
            sums["image_loss"] += float(output.image_loss.detach())
            sums["text_loss"] += float(output.text_loss.detach())
            sums["unpaired_text_loss"] += float(output.unpaired_text_loss.detach())
            for name in ("itc_loss", "itm_loss"):
                value = getattr(output, name)
                if value is not None:
                    sums[name] += float(value.detach()) / len(inputs)
            encoder_tokens += output.encoder_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), config.optimizer.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        # A NaN/inf loss or gradient must never reach the weights: every rank decides the same.
        finite = torch.tensor([float(math.isfinite(sums["loss"]) and bool(torch.isfinite(grad_norm)))],
                              device=self.device)
        if self.env.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        nonfinite = not bool(finite.item())
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.env.world_size > 1:
            # Report the global step: losses averaged over ranks (each rank's loss is its share of
            # the global mean, scaled by the world size), counts summed.
            keys = list(sums)
            totals = torch.tensor([*(sums[key] for key in keys), *seen.values(), skipped, encoder_tokens, digest],
                                  dtype=torch.float64, device=self.device)
            dist.all_reduce(totals)
            values = totals.tolist()
            sums = {key: value / self.env.world_size for key, value in zip(keys, values)}
            seen = {kind: int(value) for kind, value in zip(seen, values[len(keys):])}
            skipped, encoder_tokens, digest = int(values[-3]), int(values[-2]), int(values[-1]) % DIGEST_MODULUS
        return {**sums, "grad_norm": float(grad_norm), "encoder_tokens": encoder_tokens, "seen": seen,
                "skipped": skipped, "nonfinite": nonfinite, "sample_digest": digest}

    def fit(self) -> dict[str, Any]:
        config, env = self.config, self.env
        resumed = self.resume()
        if env.main:
            self.run.mkdir(parents=True, exist_ok=True)
            (self.run / "config.yaml").write_text(yaml.safe_dump({"train": config.model_dump(mode="json")},
                                                                 sort_keys=False))
            _truncate_metrics(self.run / "metrics.jsonl", self.step)
            log.info("model %s: %.2fM parameters; attention %s on %s rows; lr %.2e; %s",
                     config.model.preset, count_parameters(self.model) / 1e6, self.backend, self.layout,
                     self.lr, self.loader.describe())
            if resumed:
                log.info("resumed from %s at step %d", resumed, self.step)
            if self.changed_on_resume:
                log.info("settings changed on resume: %s", "; ".join(
                    f"train.{key}: {old!r} -> {new!r}" for key, (old, new) in self.changed_on_resume.items()))
                with open(self.run / "config-history.jsonl", "a") as handle:
                    handle.write(json.dumps({"step": self.step, "changed": {
                        f"train.{key}": value for key, value in self.changed_on_resume.items()}}) + "\n")
        model = parallelize(self.model, env, config)
        writer = _tensorboard(self.run) if config.tensorboard and env.main else None
        progress = _Progress(config.steps, self.step) if env.main else None
        stop_requests: list[int] = []
        previous = _catch_stop_signals(stop_requests)
        try:
            return self._loop(model, writer, progress, stop_requests)
        finally:
            _restore_signals(previous)
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()

    def _loop(self, model, writer, progress, stop_requests: list[int]) -> dict[str, Any]:
        config, env = self.config, self.env
        batches = None
        window_start, window_samples, window_tokens, window_skipped = time.perf_counter(), 0, 0, 0
        last: dict[str, Any] = {}
        path: Optional[Path] = None
        while self.step < config.steps:
            stage = self.stage_of(self.step)
            if batches is None or stage != self.stage_index:
                self._enter_stage(stage)
                end = self.stages[stage][1]
                batches = self.loader.steps(end - self.step)
            step_batches = next(batches)
            result = self.train_step(model, step_batches)
            if result["nonfinite"]:
                self._on_nonfinite(result)
            window_samples += sum(result["seen"].values())
            window_tokens += result["encoder_tokens"]
            window_skipped += result["skipped"]
            stopping = self._stop_requested(stop_requests)
            saved = self.step % config.checkpoint_every == 0 or self.step == config.steps or stopping
            if saved:
                path = self._checkpoint()
            if self.step % config.log_every == 0 or self.step == config.steps or stopping:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                last = {
                    "step": self.step,
                    "loss": result["loss"],
                    "image_loss": result["image_loss"],
                    "text_loss": result["text_loss"],
                    "unpaired_text_loss": result["unpaired_text_loss"],
                    "itc_loss": result["itc_loss"],
                    "itm_loss": result["itm_loss"],
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": result["grad_norm"],
                    "samples_per_s": window_samples / elapsed,
                    "tokens_per_s": window_tokens / elapsed,
                    "backend": f"{self.backend}/{self.layout}",
                    "seen_paired": result["seen"]["paired"],
                    "seen_image": result["seen"]["image"],
                    "seen_text": result["seen"]["text"],
                    "stage": self.stage_index,
                    "skipped_samples": window_skipped,
                    "skipped_steps": self.skipped_steps,
                    "sample_digest": result["sample_digest"],
                }
                if env.main:
                    with open(self.run / "metrics.jsonl", "a") as handle:
                        handle.write(json_line(last))
                    if writer is not None:
                        for key, value in last.items():
                            if isinstance(value, (int, float)) and key != "step":
                                writer.add_scalar(f"train/{key}", value, self.step)
                    progress.update(self.step, last)
                window_start, window_samples, window_tokens, window_skipped = time.perf_counter(), 0, 0, 0
            elif progress is not None:
                progress.update(self.step, None)
            if stopping and self.step < config.steps:
                raise Preempted(stopping, self.step, path if env.main else None)
        return last

    def _stop_requested(self, requests: list[int]) -> int:
        """The signal that asked to stop (0: none); under torchrun every rank agrees."""
        signum = requests[0] if requests else 0
        if self.env.world_size > 1:
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def _on_nonfinite(self, result: dict[str, Any]) -> None:
        """The update of this step was not applied; stop, or skip it while the budget lasts."""
        self.skipped_steps += 1
        what = f"loss {result['loss']}, gradient norm {result['grad_norm']}"
        if self.config.on_nonfinite == "stop" or self.skipped_steps > self.config.max_skipped_steps:
            newest = self.checkpoints.existing()
            kept = f"; the newest checkpoint, {newest[0]}, holds finite weights" if newest else ""
            limit = "" if self.config.on_nonfinite == "stop" else f" ({self.skipped_steps} non-finite steps)"
            raise TrainError(f"step {self.step}: {what}{limit}: the run stopped without applying it{kept}. Lower "
                             "train.optimizer.base_lr or raise warmup_steps; train.on_nonfinite: skip skips such steps")
        log.warning("step %d: %s: update skipped (%d of at most %d)", self.step, what, self.skipped_steps,
                    self.config.max_skipped_steps)

    def _checkpoint(self) -> Optional[Path]:
        if not all(bool(torch.isfinite(parameter).all()) for parameter in self.model.parameters()):
            raise TrainError(f"step {self.step}: the weights are no longer finite; no checkpoint was written")
        state = self.state_dict() if self.env.main or self.sharded else None  # FSDP: a collective
        path = None
        if self.env.main:
            path = self.checkpoints.save(self.step, state)
            log.info("checkpoint %s", path)
        if self.env.world_size > 1:
            dist.barrier()
        return path


def _catch_stop_signals(requests: list[int]):
    """SIGTERM (what SLURM and Kubernetes send before taking a node) and SIGINT only ask the loop
    to stop after the current step; a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def ask(signum, _frame):
        if requests and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requests.append(signum)
        log.warning("%s: finishing step, then saving a checkpoint and stopping", signal.Signals(signum).name)

    return {signum: signal.signal(signum, ask) for signum in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous) -> None:
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def json_line(record: dict[str, Any]) -> str:
    """One metrics line of strict JSON: NaN and infinities become null."""
    clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
             for key, value in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (the killed run's tail)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("train.tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run / "tensorboard"))


class _Progress:
    """A tqdm bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last = start

    def update(self, step: int, metrics: Optional[dict[str, Any]]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.last)
            if metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.0f}")
        elif metrics:
            log.info("step %d loss %.4f (image %.4f, text %.4f, unpaired %.4f) lr %.2e %.0f samples/s",
                     step, metrics["loss"], metrics["image_loss"], metrics["text_loss"],
                     metrics["unpaired_text_loss"], metrics["lr"], metrics["samples_per_s"])
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_training(config: Config) -> dict[str, Any]:
    if config.train is None:
        raise TrainError("the config has no train: section")
    env = init_distributed()
    try:
        trainer = Trainer(config.train, env)
        last = trainer.fit()
        return last if env.main else {}  # one summary, from rank 0
    finally:
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
