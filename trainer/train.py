"""`mmae train`: the training loop.

    mmae train --config pipeline.yaml                       # one process (resumes RUN/ if it has checkpoints)
    mmae train --config pipeline.yaml --nproc 2             # DDP via torchrun (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node=8 -m mmae.trainer --config pipeline.yaml --set train.model.preset=base

The loop reads `while step < steps: train_step(); maybe validate(); maybe log; maybe
checkpoint`. Where things live: which rows and their shares (`data_plan`), streams and the
loader (`streams`, `loader`), each forward pass's masks and packed layout, made in the loader's
workers (`masking`, `layout`, `step_inputs`), the model (`model`), losses and their collectives
(`objectives`), one optimizer step (`step`) and what it reports (`step_stats`), processes and
wrapping (`parallel`), optimizer and schedule (`schedule`), stages (`stages`), checkpoints
(`checkpoint`, `resume`, `settings`), metrics and events (`metrics`), the run folder
(`run_folder`), stop signals (`preemption`).

Restarting the same command resumes from the last good checkpoint; on CPU the resumed run
reproduces the uninterrupted run's losses bit for bit (data order, masks and augmentations are
functions of seed and step).

The tests of all this kill a real run at a known step through `mmae.faults`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any, Optional

import torch
import yaml
from mmae import faults
from mmae.schemas.config import Config, TrainConfig
from .attention import resolve_backend
from .batch import Batch
from mmae.schemas.manifest import read_manifest
from .checkpoint import Checkpointer
from .load import stored_image_size
from mmae.pipelines.outputs import OutputError, check_output
from .loader import MixedLoader, RankLoaders
from .masking import step_seed
from .metrics import Events, MetricsLog, Progress
from .step import OptimizerStep
from .step_stats import NonFinite, StepResult, Window, log_record
from .model import ModelSpec, count_parameters
from .parallel import (
    Distributed,
    agree_max,
    barrier,
    close_distributed,
    full_state,
    init_distributed,
    load_full_state,
    parallelize,
    shard_model,
)
from .preemption import Preempted, StopRequests
from .resume import (
    ResumeError,
    changes_allowed,
    checkpoint_to_resume,
    data_ranks,
    initial_weights,
)
from .run_folder import RunFolder
from .schedule import apply_schedule, build_optimizer, peak_lr
from .settings import flatten
from .stages import Stage, loader_config, objectives_of, plan_stages, stage_at, uses_alignment
from .step_inputs import Part, StepSpec, prepare_parts
from .data_plan import tokenizer_of
from .streams import DataError
from .validation import Validator

log = logging.getLogger("mmae.train")

class TrainError(RuntimeError):
    """The run cannot start or go on; the message says why."""


class Trainer:
    def __init__(self, config: TrainConfig, env: Distributed) -> None:
        self.config, self.env = config, env
        self.device = env.device
        try:
            # (resume_from and init_from may lie in the run folder: it writes checkpoints beside them)
            check_output(config.out, "train.out", folders=[*config.data_paths, config.validation.data or ""])
        except OutputError as error:
            raise TrainError(str(error)) from None
        if os.path.exists(config.out) and not os.path.isdir(config.out):
            raise TrainError(f"train.out {config.out} is a file; it names the run folder to write")
        try:
            paths = config.data_paths + ([config.validation.data] if config.validation.data else [])
            manifests = [read_manifest(path) for path in paths]
            tokenizer = tokenizer_of(paths, manifests)
        except DataError as error:
            raise TrainError(str(error)) from None
        self.data_image_sizes = sorted({size for size in map(stored_image_size, manifests) if size})
        self.tokenizer = {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size} if tokenizer else None
        self.vocab_size = tokenizer.vocab_size if tokenizer else 0
        if not self.vocab_size and config.use_text and (config.mix.paired or config.mix.text):
            raise TrainError(f"{' and '.join(config.data_paths)}: no tokenizer in the manifest; text needs one")
        spec = ModelSpec.of(config, self.vocab_size, alignment=uses_alignment(config))
        self.model_spec = spec.to_dict()  # what checkpoints record
        torch.manual_seed(config.seed)
        self.model = spec.build().to(self.device)
        self.backend, self.layout = resolve_backend(config.attention)
        self.model.set_attention(self.backend, self.layout)
        self.sharded = config.parallel == "fsdp" and env.world_size > 1
        if self.sharded:
            shard_model(self.model)  # before the optimizer: it must hold the sharded parameters
        self.stages = plan_stages(config)
        self.stage = self.stages[0]
        self.data_world = env.world_size  # data ranks: the processes of the run's first start
        self.loader = self._make_loader(self.stage)
        self.lr = peak_lr(config, env.world_size)
        self.fused = not self.sharded  # fused AdamW skips a non-finite step on the device
        self.optimizer, self.scheduler = build_optimizer(self.model, config, self.lr, warn=env.main, fused=self.fused)
        self.step = 0
        self.skipped_steps = 0  # updates not applied because the loss or gradient was not finite
        self.nonfinite = NonFinite(self.device)  # those not yet read from the device
        self.changed_on_resume: dict[str, list] = {}
        self.run = RunFolder(config.out)
        self.checkpoints = Checkpointer(self.run, config.keep_checkpoints)
        self._batches = None  # the loop's batch iterator, closed when the loop ends
        self.metrics = MetricsLog(self.run)
        self.validator = Validator(config, env)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self.stepper = OptimizerStep(self.model, self.optimizer, self.scheduler, config, env, self.autocast,
                                     sharded=self.sharded, fused=self.fused)

    # -- data and stages ------------------------------------------------------------------

    def _data_ranks(self) -> list[int]:
        per_process = self.data_world // self.env.world_size
        return [self.env.rank * per_process + offset for offset in range(per_process)]

    def _step_spec(self, stage: Stage, batches_per_step: int) -> StepSpec:
        """What the loader's workers need to prepare this stage's steps (masks, layouts)."""
        config, objectives = self.config, objectives_of(self.config, stage)
        return StepSpec(num_patches=self.model.num_patches, masking=config.masking, seed=config.seed,
                        use_text=config.use_text, per_kind=config.step_mode == "per_kind",
                        alignment=self.model.alignment and bool(objectives.itc or objectives.itm),
                        first_step=stage.start, batches_per_step=batches_per_step)

    def _make_loader(self, stage: Stage) -> RankLoaders:
        """The loaders of this process's data ranks for a stage (its mix, its own data order)."""
        config = loader_config(self.config, stage)
        ranks = self._data_ranks()
        micro = self.config.grad_accum // len(ranks)
        spec = self._step_spec(stage, micro)
        return RankLoaders([MixedLoader(config, rank=rank, world_size=self.data_world, step=spec) for rank in ranks],
                           micro)

    def _enter_stage(self, stage: Stage) -> None:
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(not name.startswith(stage.frozen) if stage.frozen else True)
        if stage != self.stage:
            self.stage = stage
            self.loader = self._make_loader(stage)
        if stage.config is not None and self.env.main:
            log.info("%s: steps %d-%d, %s", stage.name, stage.start, stage.end, self.loader.describe())

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole training state. With FSDP every rank must call it (it gathers the shards) and
        only rank 0 gets the full tensors; the saved checkpoint is the same full model either way."""
        model_state, optimizer_state = full_state(self.model, self.optimizer, self.sharded)
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "parallel": "fsdp" if self.sharded else "replicated",
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "stage": self.stage.index,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "model_spec": self.model_spec,
            "tokenizer": self.tokenizer,  # what the token ids meant (checked where a dataset meets this model)
            "data_image_sizes": self.data_image_sizes,  # the stored image sides it trained on (likewise)
            "config": self.config.model_dump(mode="json"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        written = state.get("parallel", "replicated")
        if written != ("fsdp" if self.sharded else "replicated"):
            # The optimizer state is keyed by parameter name under FSDP and by position otherwise.
            raise TrainError(f"this checkpoint was written with train.parallel: {'fsdp' if written == 'fsdp' else 'ddp'}"
                             f" over several processes; resume it the same way (its model weights load anywhere)")
        load_full_state(self.model, self.optimizer, state["model"], state["optimizer"], self.sharded)
        for group in self.optimizer.param_groups:  # a saved group's options replace ours: keep the step's kind
            group["fused"], group["foreach"] = (True, None) if self.fused else (None, group.get("foreach"))
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("stage", 0) != self.stage.index:
            self.stage = self.stages[state["stage"]]
            self.loader = self._make_loader(self.stage)
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)

    def resume(self) -> Optional[str]:
        """Load the checkpoint to continue from, or start from train.init_from's weights, or from
        scratch (trainer.resume decides which). Returns what was resumed from."""
        try:
            found = checkpoint_to_resume(self.config, self.checkpoints)
            if found is None:
                if self.config.init_from:
                    path, state = initial_weights(self.config, self.model_spec)
                    self.model.load_state_dict(state["model"])
                    log.info("initialised the model from %s (its step %d); optimizer, schedule and data start "
                             "fresh", path, state["step"])
                return None
            path, state = found
            self.changed_on_resume = changes_allowed(path, state, self.config, self.model_spec)
            data_world = data_ranks(path, state, self.config, self.env.world_size)
        except ResumeError as error:
            raise TrainError(str(error)) from None
        if data_world != self.data_world:
            self.data_world = data_world
            self.loader = self._make_loader(self.stage)
            if self.env.main:
                log.info("elastic resume: %d data ranks on %d process(es), grad_accum %d", data_world,
                         self.env.world_size, self.config.grad_accum)
        try:
            self.load_state_dict(state)
        except ValueError as error:  # the loader's own checks (world size, streams, data)
            raise TrainError(f"{path}: {error}") from None
        apply_schedule(self.optimizer, self.scheduler, self.config, self.lr)
        return path

    # -- one step -------------------------------------------------------------------------

    def step_parts(self, batches: list[Batch]) -> list[Part]:
        """The forward passes of a step's micro-batches, on the device. The loader's workers prepared
        them; a batch made elsewhere (tests, benchmarks) is prepared here, on the host."""
        parts = []
        for batch in batches:
            if batch.parts is None:
                batch.parts = prepare_parts(batch, self._step_spec(self.stage, 1), self.step)
                batch.step_of = self.step
            elif batch.step_of != self.step:
                raise TrainError(f"the loader prepared a batch for step {batch.step_of} at step {self.step}")
            parts += [part.to(self.device) for part in batch.parts]
        return parts

    def train_step(self, model: torch.nn.Module, batches: list[Batch]) -> StepResult:
        """One optimizer step over the micro-batches of this process (`step.OptimizerStep`)."""
        result = self.stepper.run(model, self.step_parts(batches), objectives_of(self.config, self.stage),
                                  step_seed(self.config.seed, self.step), batches)
        self.step += 1
        return result

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        config, env = self.config, self.env
        resumed = self.resume()
        if resumed and self.step > config.steps:
            raise TrainError(f"{resumed} is at step {self.step}, past train.steps {config.steps}: nothing would be "
                             f"trained. Raise train.steps above {self.step} to continue, or start a new run with "
                             "another train.out")
        if resumed and self.step == config.steps:
            if env.main:
                log.info("run complete at step %d of %d; nothing to do (%s). Raise train.steps to train on, or use "
                         "another train.out for a new run", self.step, config.steps, resumed)
            return {"step": self.step, "complete": True, "checkpoint": resumed}
        if env.main:
            self.run.makedirs()
            self.run.write_text("config.yaml", text=yaml.safe_dump({"train": config.model_dump(mode="json")},
                                                                   sort_keys=False))
            self.metrics.truncate_after(self.step)
            log.info("model %s: %.2fM parameters; attention %s on %s rows; lr %.2e; %s",
                     config.model.preset, count_parameters(self.model) / 1e6, self.backend, self.layout,
                     self.lr, self.loader.describe())
            if resumed:
                log.info("resumed from %s at step %d", resumed, self.step)
            if self.changed_on_resume:
                log.info("settings changed on resume: %s", "; ".join(
                    f"train.{key}: {old!r} -> {new!r}" for key, (old, new) in self.changed_on_resume.items()))
                self.run.append_text("config-history.jsonl", text=json.dumps({"step": self.step, "changed": {
                    f"train.{key}": value for key, value in self.changed_on_resume.items()}}) + "\n")
        if config.validation.enabled:
            self.validator.prepare(self._data_ranks(), self.data_world)
        model = parallelize(self.model, env, config)
        events = None
        if config.tensorboard and env.main:
            try:
                events = Events(self.run, self.step)
            except RuntimeError as error:
                raise TrainError(str(error)) from None
        progress = Progress(config.steps, self.step) if env.main else None
        try:
            with StopRequests() as stops:
                last = self._loop(model, events, progress, stops)
            if events is not None:
                events.hyperparameters(flatten(config.model_dump(mode="json")),
                                       {key: value for key, value in last.items() if key.endswith("loss")})
            return last
        finally:
            if self._batches is not None:
                # Shuts the DataLoader workers down now, whatever ended the loop (a second
                # Ctrl-C included): they ignore stop signals, so nothing else would.
                self._batches.close()
                self._batches = None
            if env.main:
                self.metrics.flush()
            if progress is not None:
                progress.close()
            if events is not None:
                events.close()

    def _loop(self, model, events: Optional[Events], progress: Optional[Progress], stops: StopRequests) -> dict:
        config, env = self.config, self.env
        batches = None
        window = Window()
        last: dict[str, Any] = {}
        path: Optional[str] = None
        fault = faults.after_step()  # a test's crash point (mmae.faults); a no-op otherwise
        while self.step < config.steps:
            stage = stage_at(self.stages, self.step)
            if batches is None or stage != self.stage:
                self._enter_stage(stage)
                if batches is not None:
                    batches.close()
                batches = self._batches = self.loader.steps(stage.end - self.step)
            result = self.train_step(model, next(batches))
            self.nonfinite.note(result, self.step)
            window.add(result)
            stopping = int(agree_max(stops.first, env))
            final = self.step == config.steps
            logging_step = self.step % config.log_every == 0 or final or stopping
            checkpoint_step = self.step % config.checkpoint_every == 0 or final or stopping
            if logging_step or checkpoint_step:
                self._check_nonfinite()  # the one read of the device's flags, on these steps only
            if config.validation.enabled and (self.step % config.validation.every == 0 or final):
                self._report_validation(events, progress)
            if logging_step:
                figures = result.read(env)
                totals = window.totals(env)
                last = log_record(self.step, figures, totals, lr=self.scheduler.get_last_lr()[0],
                                  backend=f"{self.backend}/{self.layout}", stage=self.stage.index,
                                  skipped_steps=self.skipped_steps)
                if env.main:
                    self.metrics.append(last)
                    if events is not None:
                        events.scalars("train", last, self.step)
                    progress.update(self.step, last)
                window = Window()
            elif progress is not None:
                progress.update(self.step, None)
            if checkpoint_step:
                path = self._checkpoint()
                if events is not None:
                    events.flush()
            if stopping and not final:
                raise Preempted(stopping, self.step, path if env.main else None)
            fault(self.step)
        return last

    def _report_validation(self, events: Optional[Events], progress: Optional[Progress]) -> None:
        record = self.validator.run(self.model, self.step, self._data_ranks(), self.data_world, self.autocast)
        if not self.env.main:
            return
        self.metrics.append(record)
        progress.note(f"step {self.step} validation loss {record['loss']:.4f} (image {record['image_loss']:.4f}, "
                      f"text {record['text_loss']:.4f}, unpaired {record['unpaired_text_loss']:.4f}) "
                      f"on {record['samples']} samples")
        if events is not None:
            events.scalars("validation", record, self.step)
            picture = self.validator.picture(self.model)
            if picture is not None:
                events.image("validation/reconstruction", picture, self.step)

    def _check_nonfinite(self) -> None:
        """Read the device's record of non-finite steps (their updates were never applied); stop,
        or count them as skipped while the budget lasts. Called on logged and checkpoint steps, so
        `train.on_nonfinite: stop` stops at the first of those after the bad step (log_every: 1
        stops at the bad step itself) and no checkpoint is ever written after an unread one."""
        new, first, what = self.nonfinite.read()
        if not new:
            return
        self.skipped_steps += new
        if self.config.on_nonfinite == "stop" or self.skipped_steps > self.config.max_skipped_steps:
            newest = self.checkpoints.existing()
            kept = f"; the newest checkpoint, {self.checkpoints.url(newest[0])}, holds finite weights" if newest else ""
            limit = "" if self.config.on_nonfinite == "stop" else f" ({self.skipped_steps} non-finite steps)"
            raise TrainError(f"step {first}: {what}{limit}: the run stopped without applying it{kept}. Lower "
                             "train.optimizer.base_lr or raise warmup_steps; train.on_nonfinite: skip skips such steps")
        log.warning("step %d: %s: update skipped (%d of at most %d)", first, what, self.skipped_steps,
                    self.config.max_skipped_steps)

    def _checkpoint(self) -> Optional[str]:
        if not all(bool(torch.isfinite(parameter).all()) for parameter in self.model.parameters()):
            raise TrainError(f"step {self.step}: the weights are no longer finite; no checkpoint was written")
        state = self.state_dict() if self.env.main or self.sharded else None  # FSDP: a collective
        path = None
        if self.env.main:
            path = self.checkpoints.save(self.step, state)
            self.metrics.flush()
            log.info("checkpoint %s", path)
        barrier(self.env)
        return path


def run_training(config: Config) -> dict[str, Any]:
    if config.train is None:
        raise TrainError("the config has no train: section")
    env = init_distributed()
    try:
        trainer = Trainer(config.train, env)
        last = trainer.fit()
        return last if env.main else {}  # one summary, from rank 0
    finally:
        close_distributed(env)
