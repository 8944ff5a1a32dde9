"""`mmae train --nproc N`: N processes on this machine, one per rank, and the signals they get.

torchrun would do the starting, but not the stopping the way a job needs it: SIGTERM to the
group prints its `SignalException` traceback, and SIGTERM to the command alone (what a scheduler
sends to the process it started) leaves the ranks training, orphaned. So the ranks run in a
session of their own, with torch.distributed's standard environment (`RANK`, `WORLD_SIZE`,
`MASTER_ADDR`...), and every SIGTERM or SIGINT this process gets is forwarded to each rank
exactly once: they finish the step, save, and exit 143 (130), and so does this command. A
second Ctrl-C interrupts the ranks at once, as in one process. A rank that fails brings the
others down (SIGTERM, then SIGKILL after `GRACE_S`) and its exit code is the command's.
For several machines, use torchrun (`torchrun ... -m mmae.trainer`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 60.0  # how long ranks may take to save and leave before they are killed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, arguments: list[str]) -> int:
    """Run `python -m mmae.trainer ARGUMENTS` as `nproc` ranks; return the command's exit code."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_RANK": "0"}
    ranks = [subprocess.Popen([sys.executable, "-m", "mmae.trainer", *arguments], start_new_session=True,
                              env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_WORLD_SIZE": str(nproc)})
             for rank in range(nproc)]
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed_at = None
        while any(process.poll() is None for process in ranks):
            codes = [process.poll() for process in ranks]
            if failed_at is None and any(code not in (None, 0) for code in codes) and not received:
                failed_at = time.monotonic()  # one rank failed: the others get a grace period, then a stop
            if failed_at is not None:
                waited = time.monotonic() - failed_at
                for process in ranks:
                    if process.poll() is None:
                        if waited > 2 * GRACE_S:
                            process.kill()
                        elif waited > GRACE_S / 4:
                            process.terminate()
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [process.returncode for process in ranks]
    code = next((value for value in codes if value not in (0,)), 0)
    if code < 0:  # killed by a signal: report it as a shell does
        code = 128 - code
    return code
