"""Checkpoints: one component that sees only state dicts.

`RUN/checkpoints/step-0000100.pt` files are written under a temporary name and renamed (local
disks and object stores alike, see trainer.run_folder), then the `last` pointer is replaced the
same way; only the newest `keep` readable ones are kept (a damaged file is neither counted nor
deleted, so it can never push a good one out), and the temporary files of a save that was
killed are removed. Loading uses `torch.load(weights_only=True)`; a file that cannot be read
(say, truncated by a crash or a full disk) is reported and the previous one is used; if
checkpoints exist and none can be read, `NoReadableCheckpoint` is raised and nothing is deleted.
"""

from __future__ import annotations

import logging
import posixpath
import re
import zipfile
from typing import Any, Optional

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from mmae.pipelines.localfiles import check_regular
from .run_folder import RunFolder

log = logging.getLogger("mmae.checkpoint")

NAME = re.compile(r"^step-(\d{7,})\.pt$")
FOLDER = "checkpoints"


class NoReadableCheckpoint(RuntimeError):
    """Checkpoints exist, and none of them can be loaded."""


class CheckpointNotFound(FileNotFoundError):
    """`--checkpoint` names nothing that holds a checkpoint; the message says what it found."""


class NonFiniteWeights(CheckpointNotFound):
    """The checkpoint loads, but some of its weights are NaN or infinite: no result may come of it."""


def first_non_finite(tensors: dict[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def check_finite(tensors: dict[str, Any], where: str) -> None:
    name = first_non_finite(tensors)
    if name is not None:
        raise NonFiniteWeights(f"{where}: the weight {name} holds NaN or inf values; refusing to use these weights "
                               "(an earlier checkpoint of the run, if any, may hold finite ones)")


def _whole(handle) -> bool:
    """A cheap check that a checkpoint is whole: torch.save writes a zip, whose central
    directory (at the end of the file) a truncated or overwritten file lacks."""
    try:
        with zipfile.ZipFile(handle) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def readable(url: str) -> bool:
    """Does the file load as a checkpoint? A whole zip that `torch.load(weights_only=True)`
    unpickles into a state with model weights. A local file is memory-mapped, so the tensors'
    bytes are not read: cheap enough to ask of every kept checkpoint at every save."""
    url = str(url)
    try:
        check_regular(url)
        with fsspec.open(url, "rb") as handle:
            if not _whole(handle):
                return False
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            state = load_checkpoint(url)
        return isinstance(state, dict) and isinstance(state.get("model"), dict) and "model_spec" in state
    except Exception:  # noqa: BLE001 - whatever a damaged or foreign file raises: not loadable
        return False


class Checkpointer:
    def __init__(self, run: RunFolder, keep: int = 3) -> None:
        self.run = run
        self.keep = keep

    @staticmethod
    def name_for(step: int) -> str:
        return f"step-{step:07d}.pt"

    def url(self, name: str) -> str:
        return self.run.display(FOLDER, name)

    def existing(self) -> list[str]:
        """Checkpoint file names, newest first."""
        found = [(int(match.group(1)), name) for name in self.run.listdir(FOLDER) if (match := NAME.match(name))]
        return [name for _, name in sorted(found, reverse=True)]

    def _readable(self, name: str) -> bool:
        return readable(self.url(name))

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a save that was killed (one run saves at a time)."""
        for name in self.run.listdir(FOLDER):
            if name.startswith(".tmp-"):
                self.run.remove(FOLDER, name)

    def save(self, step: int, state: dict[str, Any]) -> str:
        self.remove_stale_temporaries()
        name = self.name_for(step)
        self.run.write_atomic((FOLDER, name), lambda handle: torch.save(state, handle))
        self.run.write_text(FOLDER, "last", text=name + "\n")
        whole = [other for other in self.existing() if other == name or self._readable(other)]
        for old in whole[self.keep:]:
            self.run.remove(FOLDER, old)
        return self.url(name)

    def load_latest(self) -> Optional[tuple[str, dict[str, Any]]]:
        """The newest readable checkpoint (the `last` pointer first), or None."""
        candidates = self.existing()
        if self.run.exists(FOLDER, "last"):
            named = _pointer(self.run.path(FOLDER, "last"), self.run.fs)  # None unless it names a checkpoint
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        problems = []
        for name in candidates:
            try:
                state = load_checkpoint(self.url(name))
                check_finite(state["model"], self.url(name))
                return self.url(name), state
            except Exception as error:  # noqa: BLE001 - any unreadable file: report, fall back
                problems.append(f"{name}: {type(error).__name__}: {str(error)[:120]}")
                log.warning("checkpoint %s is unreadable or unusable (%s: %s); trying the previous one",
                            self.url(name), type(error).__name__, str(error)[:200])
        if candidates:
            raise NoReadableCheckpoint(
                f"{self.run.display(FOLDER)} holds {len(candidates)} checkpoint(s) and none can be loaded "
                f"({'; '.join(problems[:3])}); nothing was deleted. Move them away to start a fresh run, or point "
                "train.out elsewhere")
        return None


def load_checkpoint(url: str) -> dict[str, Any]:
    check_regular(str(url))  # a FIFO named step-0000100.pt is never waited on
    with fsspec.open(str(url), "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)


def resolve_checkpoint(given: str) -> str:
    """A checkpoint file from what a user passes: the file itself, a `last` pointer, a run's
    `checkpoints/` folder or the run folder (its newest readable checkpoint, `last` first).
    Paths and fsspec URLs alike."""
    given = str(given)
    fs, path = fsspec.core.url_to_fs(given)
    if fs.isdir(path):
        folder = RunFolder(given)
        if fs.isdir(folder.path(FOLDER)):
            folder = RunFolder(folder.display(FOLDER))
        names = [name for name in folder.listdir() if NAME.match(name)]
        named = _pointer(folder.path("last"), folder.fs) if folder.exists("last") else None
        if named in names and readable(folder.display(named)):
            return folder.display(named)
        for name in sorted(names, reverse=True):
            if readable(folder.display(name)):
                return folder.display(name)
        raise CheckpointNotFound(f"{given}: no readable step-*.pt checkpoint in {folder}")
    if posixpath.basename(path) == "last" and fs.isfile(path):
        named = _pointer(path, fs)
        if named is None:
            raise CheckpointNotFound(f"{given}: not a `last` pointer (it should hold one step-*.pt name)")
        target = posixpath.join(posixpath.dirname(given), named) if "/" in given else named
        if not fs.isfile(posixpath.join(posixpath.dirname(path), named)):
            raise CheckpointNotFound(f"{given} names {named}, which does not exist")
        return target
    if not fs.isfile(path):
        raise CheckpointNotFound(f"{given}: no such checkpoint (a step-*.pt file, a `last` pointer, or a run folder)")
    return given


def _pointer(path: str, fs) -> Optional[str]:
    """The checkpoint name a `last` file holds, if it holds one (a name in the same folder)."""
    if not fs.isfile(path):
        return None  # a FIFO or folder named `last` is never opened
    with fs.open(path, "rb") as handle:
        raw = handle.read(256)
    try:
        named = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return named if NAME.match(named) else None
