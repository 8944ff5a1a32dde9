"""Fault points for the tests of crash safety: the one place product code looks for them.

A test that must kill a real process at a known moment (not a race) sets one variable in the
environment of the command it starts; nothing else in mmae reads them, and with neither set
each fault point is a no-op decided once, when its stage starts:

- `MMAE_FAULT=kill@N | term@N | int@N` (`mmae train`): right after step N (and its checkpoint,
  if one is due) the trainer SIGKILLs itself, or sends SIGTERM / SIGINT (a graceful stop; to the
  whole process group when the trainer leads one, as a terminal or SLURM would).
- `MMAE_TEST_KILL_AFTER_CHUNKS=N` (`mmae build`): a download worker SIGKILLs itself right after
  committing its N-th chunk (what `kill -9` or a lost node does at an arbitrary moment).
"""

from __future__ import annotations

import os
import signal
from typing import Callable

TRAIN = "MMAE_FAULT"
BUILD_KILL_AFTER_CHUNKS = "MMAE_TEST_KILL_AFTER_CHUNKS"


def after_step() -> Callable[[int], None]:
    """The trainer's fault point: call it with each finished step."""
    spec = os.environ.get(TRAIN, "")
    if "@" not in spec:
        return lambda step: None
    kind, _, at = spec.partition("@")
    signum = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[kind]

    def maybe(step: int) -> None:
        if step == int(at):
            if signum != signal.SIGKILL and os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), signum)
            else:
                os.kill(os.getpid(), signum)

    return maybe


def after_chunks() -> Callable[[int], None]:
    """The build's fault point: call it with the number of chunks this worker has committed."""
    limit = os.environ.get(BUILD_KILL_AFTER_CHUNKS)
    if not limit:
        return lambda committed: None

    def maybe(committed: int) -> None:
        if committed >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe
