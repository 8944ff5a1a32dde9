"""What a run reports: `metrics.jsonl` (strict JSON lines), TensorBoard events, a progress bar.

- `MetricsLog`: one JSON object per logged step (training and validation records); NaN and
  infinities become null; on resume the lines after the checkpoint's step (a killed run's tail)
  are dropped, so the file reads as one uninterrupted run.
- `Events`: TensorBoard scalars, reconstruction images and the run's hyperparameters, continued
  across resumes in one stream (`purge_step` hides a killed run's events after the checkpoint).
  With a remote run folder the events are written locally and copied up at each checkpoint.
- `Progress`: a tqdm bar on a terminal, log lines with step N/M, rate and ETA otherwise.
What one step reports, and its reduction over ranks, is `step_stats`.
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
from typing import Any, Optional

from .run_folder import RunFolder

log = logging.getLogger("mmae.train")

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
