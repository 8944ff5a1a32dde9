"""What a run reports: `metrics.jsonl` (strict JSON lines), TensorBoard events, a progress bar.

- `MetricsLog`: one JSON object per logged step (training and validation records); NaN and
  infinities become null; on resume the lines after the checkpoint's step (a killed run's tail)
  are dropped, so the file reads as one uninterrupted run.
- `Events`: TensorBoard scalars, reconstruction images and the run's hyperparameters, continued
  across resumes in one stream (`purge_step` hides a killed run's events after the checkpoint).
  With a remote run folder the events are written locally and copied up at each checkpoint.
- `sample_digest`: which samples a step read, whatever their split over ranks and micro-batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from mmae.trainer.run_folder import RunFolder

log = logging.getLogger("mmae.train")

DIGEST_MODULUS = 1 << 40  # per-rank digests summed over ranks stay exact in float64


def sample_digest(id_lists: list[list[str]]) -> int:
    """A sum of 40-bit id hashes (the global step's is the all-reduced sum)."""
    total = sum(int.from_bytes(hashlib.blake2b(sample.encode(), digest_size=5).digest(), "big")
                for ids in id_lists for sample in ids)
    return total % DIGEST_MODULUS


@dataclass
class StepResult:
    """One optimizer step's figures as the step leaves them: the losses, gradient norm and
    non-finite flag still on the device (reading them would wait for the step to finish), the
    counts on the host. `read()` makes the global step's figures, on the steps that are logged."""

    sums: Any  # [len(LOSS_NAMES)] float64 device tensor: this process's losses
    grad_norm: Any  # device scalar (the same on every rank: gradients are all-reduced)
    nonfinite: Any  # device bool scalar, agreed by every rank
    seen: list[int]  # this process's samples of each kind (KINDS order)
    skipped: int  # this process's samples lost to unreadable data
    encoder_tokens: int
    digest: int

    def read(self, env) -> dict[str, Any]:
        """Losses averaged over ranks (each rank's loss is its share of the global mean, scaled by
        the world size), counts summed: the one host read of a logged step."""
        from mmae.trainer.objectives import LOSS_NAMES
        from mmae.trainer.parallel import sum_device, sum_over_ranks

        values = (sum_device(self.sums, env) / env.world_size).tolist()
        host = sum_over_ranks([*self.seen, self.digest], env)
        return {**dict(zip(LOSS_NAMES, values)), "grad_norm": float(self.grad_norm),
                "seen": dict(zip(("paired", "image", "text"), map(int, host[:3]))),
                "sample_digest": int(host[3]) % DIGEST_MODULUS}


class Window:
    """Samples, encoder tokens and skipped samples since the last logged step (host counts)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.samples = self.encoder_tokens = self.skipped = 0

    def add(self, result: StepResult) -> None:
        self.samples += sum(result.seen)
        self.encoder_tokens += result.encoder_tokens
        self.skipped += result.skipped

    def totals(self, env) -> dict[str, float]:
        from mmae.trainer.parallel import sum_over_ranks

        samples, tokens, skipped = sum_over_ranks([self.samples, self.encoder_tokens, self.skipped], env)
        return {"samples": samples, "encoder_tokens": int(tokens), "skipped": int(skipped),
                "seconds": max(time.perf_counter() - self.started, 1e-9)}


class NonFinite:
    """Non-finite steps recorded on the device (their updates were skipped there), read when the
    loop chooses: how many since the last read, and the first one's step, loss and gradient norm."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.first = torch.full((3,), -1.0, dtype=torch.float64, device=device)  # step, loss, grad norm

    def note(self, result: StepResult, step: int) -> None:
        import torch

        fresh = result.nonfinite & (self.first[0] < 0)
        figures = torch.stack([torch.full((), float(step), dtype=torch.float64, device=self.device),
                               result.sums[0], result.grad_norm.to(torch.float64)])
        self.first = torch.where(fresh, figures, self.first)
        self.count += result.nonfinite

    def read(self) -> tuple[int, int, str]:
        """(new non-finite steps, the first one's step, what was not finite); resets the record."""
        import torch

        count, (step, loss, norm) = int(self.count), self.first.tolist()
        self.count = torch.zeros_like(self.count)
        self.first = torch.full_like(self.first, -1.0)
        return count, int(step), f"loss {loss}, gradient norm {norm}"


def json_line(record: dict[str, Any]) -> str:
    """One metrics line of strict JSON: NaN and infinities become null."""
    clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
             for key, value in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


class MetricsLog:
    """Local run folders get each line as it is logged. Object stores cannot append (each append
    rewrites the file), so there lines are buffered and written with each checkpoint: the lines a
    resume would drop (after the last checkpoint) are the only ones a crash can lose."""

    def __init__(self, run: RunFolder, name: str = "metrics.jsonl") -> None:
        self.run, self.name = run, name
        self.pending: list[str] = []

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (the killed run's tail)."""
        if not self.run.exists(self.name):
            return
        kept = [line for line in self.run.read_text(self.name).splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.run.write_text(self.name, text="".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        if self.run.local:
            self.run.append_text(self.name, text=json_line(record))
        else:
            self.pending.append(json_line(record))

    def flush(self) -> None:
        if self.pending:
            self.run.append_text(self.name, text="".join(self.pending))
            self.pending = []


class Events:
    """TensorBoard events under RUN/tensorboard (needs the tensorboard package)."""

    def __init__(self, run: RunFolder, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("train.tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
        self.run = run
        if run.local:
            self.folder = run.path("tensorboard")
        else:
            key = hashlib.sha256(run.url.encode()).hexdigest()[:16]
            self.folder = os.path.join(tempfile.gettempdir(), f"mmae-tensorboard-{key}")
        # purge_step: events a killed run wrote after the step we resume from are hidden (those of
        # that step itself were written before its checkpoint, and stay).
        self.writer = SummaryWriter(self.folder, purge_step=start_step + 1 if start_step else None)

    def scalars(self, prefix: str, record: dict[str, Any], step: int) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, tag: str, picture, step: int) -> None:
        """A PIL image."""
        import numpy as np

        self.writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def hyperparameters(self, flat: dict[str, Any], final: dict[str, float]) -> None:
        """The run's settings beside its final metrics (TensorBoard's HPARAMS tab)."""
        settings = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                    for key, value in flat.items() if value is not None}
        metrics = {f"hparam/{key}": value for key, value in final.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        self.writer.add_hparams(settings, metrics, run_name=".")

    def flush(self) -> None:
        self.writer.flush()
        if not self.run.local:
            for name in os.listdir(self.folder):
                self.run.fs.put(os.path.join(self.folder, name), self.run.path("tensorboard", name), recursive=True)

    def close(self) -> None:
        self.flush()
        self.writer.close()


def eta_text(seconds: float) -> str:
    """12s, 3m05s, 2h04m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A tqdm bar on a terminal; plain log lines (step N/M, rate, ETA) otherwise."""

    def __init__(self, total: int, start: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.total, self.first, self.last = total, start, start
        self.started = time.perf_counter()

    def update(self, step: int, metrics: Optional[dict[str, Any]]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.last)
            if metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.0f}")
        elif metrics:
            elapsed = time.perf_counter() - self.started
            rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
            eta = eta_text((self.total - step) / rate) if rate > 0 else "?"
            log.info("step %d/%d loss %.4f (image %.4f, text %.4f, unpaired %.4f) lr %.2e %.0f samples/s "
                     "%.2f steps/s ETA %s", step, self.total, metrics["loss"], metrics["image_loss"],
                     metrics["text_loss"], metrics["unpaired_text_loss"], metrics["lr"], metrics["samples_per_s"],
                     rate, eta)
        self.last = step

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
