"""The run folder, local or remote: `train.out` may be a path or an fsspec URL (s3://, gs://, ...).

Everything a run writes goes through `RunFolder`: checkpoints (trainer.checkpoint), metrics and
TensorBoard events (trainer.metrics), `config.yaml` and `config-history.jsonl`. Writes are
atomic everywhere: a temporary name in the same folder, then a rename (local: fsync and
`os.replace`; object stores: the object appears whole, and only under the final name once
complete). Object stores cannot append, so an append there rewrites the (small) file.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem


class RunFolder:
    def __init__(self, url: str) -> None:
        self.url = str(url).rstrip("/") or str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def __str__(self) -> str:
        return self.url

    def path(self, *parts: str) -> str:
        """A path inside the run folder, in the file system's own terms."""
        return posixpath.join(self.root, *parts) if not self.local else os.path.join(self.root, *parts)

    def display(self, *parts: str) -> str:
        """What to print for a path inside the run folder (the URL a user would type)."""
        return posixpath.join(self.url, *parts) if not self.local else os.path.join(self.url, *parts)

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def open(self, *parts: str, mode: str = "rb") -> IO:
        return self.fs.open(self.path(*parts), mode)

    def read_text(self, *parts: str) -> str:
        with self.fs.open(self.path(*parts), "rb") as handle:
            return handle.read().decode("utf-8")

    def write_atomic(self, parts: tuple[str, ...], write) -> str:
        """Call `write(handle)` on a temporary file beside the target, then rename it into place."""
        target = self.path(*parts)
        folder, name = posixpath.split(target) if not self.local else os.path.split(target)
        self.fs.makedirs(folder, exist_ok=True)
        temporary = (posixpath.join if not self.local else os.path.join)(folder, f".tmp-{uuid.uuid4().hex[:8]}-{name}")
        try:
            if self.local:
                with open(temporary, "wb") as handle:
                    write(handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, target)
            else:
                with self.fs.open(temporary, "wb") as handle:
                    write(handle)
                self.fs.mv(temporary, target)
        except BaseException:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)
            raise
        return target

    def write_text(self, *parts: str, text: str) -> None:
        self.write_atomic(parts, lambda handle: handle.write(text.encode("utf-8")))

    def append_text(self, *parts: str, text: str) -> None:
        if self.local:
            self.makedirs(*parts[:-1])
            with open(self.path(*parts), "a", encoding="utf-8") as handle:
                handle.write(text)
            return
        before = self.read_text(*parts) if self.exists(*parts) else ""
        self.write_text(*parts, text=before + text)

    def listdir(self, *parts: str) -> list[str]:
        """Names in a folder of the run ([] when it does not exist)."""
        folder = self.path(*parts)
        if not self.fs.isdir(folder):
            return []
        return sorted(posixpath.basename(entry.rstrip("/")) for entry in self.fs.ls(folder, detail=False))

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path)
