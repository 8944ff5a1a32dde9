"""What one optimizer step reports, and how the logged steps' figures are made.

- `StepResult`: a step's losses, gradient norm and non-finite flag as the step leaves them (on
  the device: reading them would wait for the step), and its host counts.
- `Window`: samples, encoder tokens and skipped samples since the last logged step.
- `NonFinite`: the non-finite steps the device recorded (their updates were skipped there).
- `log_record`: the `metrics.jsonl` line of a logged step.
Figures are summed over ranks by name (`sum_named`), never by position in a packed list.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from .batch import KINDS


def sum_named(values: dict[str, float], env) -> dict[str, float]:
    """Sums over ranks of named host figures (one all-reduce; the names keep their order)."""
    from .parallel import sum_over_ranks

    names = list(values)
    return dict(zip(names, sum_over_ranks([values[name] for name in names], env)))


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
        from .objectives import LOSS_NAMES
        from .parallel import sum_device

        values = (sum_device(self.sums, env) / env.world_size).tolist()
        host = sum_named({**dict(zip(KINDS, self.seen)), "digest": self.digest}, env)
        return {**dict(zip(LOSS_NAMES, values)), "grad_norm": float(self.grad_norm),
                "seen": {kind: int(host[kind]) for kind in KINDS},
                "sample_digest": int(host["digest"]) % DIGEST_MODULUS}


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
        totals = sum_named({"samples": self.samples, "encoder_tokens": self.encoder_tokens,
                            "skipped": self.skipped}, env)
        return {"samples": totals["samples"], "encoder_tokens": int(totals["encoder_tokens"]),
                "skipped": int(totals["skipped"]), "seconds": max(time.perf_counter() - self.started, 1e-9)}


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


def log_record(step: int, figures: dict[str, Any], totals: dict[str, float], *, lr: float, backend: str,
               stage: int, skipped_steps: int) -> dict[str, Any]:
    """The `metrics.jsonl` line of a logged training step."""
    from .objectives import LOSS_NAMES

    return {"step": step, "split": "train", **{name: figures[name] for name in LOSS_NAMES},
            "lr": lr, "grad_norm": figures["grad_norm"],
            "samples_per_s": totals["samples"] / totals["seconds"],
            "tokens_per_s": totals["encoder_tokens"] / totals["seconds"],
            "backend": backend, **{f"seen_{kind}": figures["seen"][kind] for kind in KINDS},
            "stage": stage, "skipped_samples": totals["skipped"],
            "skipped_steps": skipped_steps, "sample_digest": figures["sample_digest"]}
