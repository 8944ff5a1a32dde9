"""Build progress as the driver sees it, on any runner: committed chunk files in the staging area
against the plan. One log line every `progress_every_s`: input rows done of the total, rate, ETA."""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import fsspec
from .plan import BuildPlan, parse_chunk_name
from .staging import STAGING
from ..shards import join
from mmae.schemas.config import DataConfig

log = logging.getLogger("mmae.build")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressMonitor:
    """A daemon thread that lists OUT/staging/chunks and logs rows done / total, rate and ETA."""

    def __init__(self, config: DataConfig, plan: BuildPlan) -> None:
        self.config = config
        self.plan = plan
        self.names = {source.name: index for index, source in enumerate(config.sources)}
        self.stop_event = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.started = time.monotonic()
        self.rows_at_start = 0

    def rows_done(self) -> tuple[int, int]:
        """(input rows covered by committed chunks, committed chunks)."""
        fs, root = fsspec.core.url_to_fs(join(self.config.output, STAGING, "chunks"))
        try:
            paths = fs.find(root)
        except (FileNotFoundError, OSError):
            return 0, 0
        rows = chunks = 0
        for path in paths:
            parts = path.rstrip("/").split("/")
            parsed = parse_chunk_name(parts[-1]) if parts[-1].endswith(".parquet") else None
            if parsed is None or len(parts) < 2 or parts[-2] not in self.names:
                continue
            key = (self.names[parts[-2]], *parsed)
            if key in self.plan.chunk_input_rows:
                rows += self.plan.chunk_input_rows[key]
                chunks += 1
        return rows, chunks

    def line(self) -> str:
        rows, chunks = self.rows_done()
        total = max(self.plan.total_rows, 1)
        elapsed = time.monotonic() - self.started
        new_rows = rows - self.rows_at_start
        rate = new_rows / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.plan.total_rows - rows) / rate) if rate > 0 else "unknown"
        return (f"progress: {rows:,} of {self.plan.total_rows:,} input rows ({rows / total:.1%}) in "
                f"{chunks:,} of {self.plan.total_chunks:,} chunks; {rate:,.1f} rows/s; ETA {eta}")

    def _loop(self) -> None:
        while not self.stop_event.wait(self.config.progress_every_s):
            try:
                log.info(self.line())
            except Exception as error:  # progress must never break a build
                log.debug("progress: %s", error)

    def __enter__(self) -> "ProgressMonitor":
        self.rows_at_start, chunks = self.rows_done()
        if chunks:
            log.info("%d of %d chunks (%d of %d input rows) were committed by an earlier run",
                     chunks, self.plan.total_chunks, self.rows_at_start, self.plan.total_rows)
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._loop, name="mmae-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
