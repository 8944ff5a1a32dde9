"""Stopping on request: SIGTERM (what SLURM and Kubernetes send before taking a node) and SIGINT
ask the loop to stop after the current step; it saves a checkpoint and raises `Preempted`, whose
exit code is what a shell reports for the signal (143 for SIGTERM, 130 for SIGINT). A second
Ctrl-C interrupts at once."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

log = logging.getLogger("mmae.train")


class Preempted(Exception):
    """SIGTERM or SIGINT arrived: the current step finished, a checkpoint was saved."""

    def __init__(self, signum: int, step: int, path: Optional[str]) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; saved {path}; run the same command to resume")
        self.exit_code = 128 + signum


class StopRequests:
    """A context that records stop signals instead of dying of them (main thread only)."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._ask) for signum in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *_exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _ask(self, signum, _frame) -> None:
        if self.signals and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signals.append(signum)
        log.warning("%s: finishing step, then saving a checkpoint and stopping", signal.Signals(signum).name)

    @property
    def first(self) -> int:
        return self.signals[0] if self.signals else 0
