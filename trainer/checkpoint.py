"""Checkpoints: one component that sees only state dicts.

`RUN/checkpoints/step-0000100.pt` files are written under a temporary name and renamed, then
the `last` pointer is replaced the same way; only the newest `keep` readable ones are kept (a
damaged file is neither counted nor deleted, so it can never push a good one out), and the
temporary files of a save that was killed are removed. Loading uses
`torch.load(weights_only=True)`; a file that cannot be read (say, truncated by a crash or a
full disk) is reported and the previous one is used; if checkpoints exist and none can be read,
`NoReadableCheckpoint` is raised and nothing is deleted.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("mmae.checkpoint")

NAME = re.compile(r"^step-(\d{7,})\.pt$")


class NoReadableCheckpoint(RuntimeError):
    """Checkpoints exist, and none of them can be loaded."""


def readable(path: Path) -> bool:
    """A cheap check that a checkpoint is whole: torch.save writes a zip, whose central
    directory (at the end of the file) a truncated or overwritten file lacks."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class Checkpointer:
    def __init__(self, folder: str | Path, keep: int = 3) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:07d}.pt"

    def existing(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.folder.exists():
            return []
        found = [(int(match.group(1)), path) for path in self.folder.iterdir() if (match := NAME.match(path.name))]
        return [path for _, path in sorted(found, reverse=True)]

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a save that was killed (one run saves at a time)."""
        if self.folder.exists():
            for path in self.folder.glob(".tmp-*"):
                path.unlink(missing_ok=True)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries()
        target = self.path_for(step)
        temporary = target.with_name(f".tmp-{os.getpid()}-{target.name}")
        torch.save(state, temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        pointer = self.folder / ".tmp-last"
        pointer.write_text(target.name + "\n")
        os.replace(pointer, self.folder / "last")
        whole = [path for path in self.existing() if path == target or readable(path)]
        for old in whole[self.keep:]:
            old.unlink(missing_ok=True)
        return target

    def load_latest(self) -> Optional[tuple[Path, dict[str, Any]]]:
        """The newest readable checkpoint (the `last` pointer first), or None."""
        candidates = self.existing()
        pointer = self.folder / "last"
        if pointer.exists():
            named = self.folder / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        problems = []
        for path in candidates:
            try:
                return path, load_checkpoint(path)
            except Exception as error:  # noqa: BLE001 - any unreadable file: report, fall back
                problems.append(f"{path.name}: {type(error).__name__}: {str(error)[:120]}")
                log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                            path, type(error).__name__, str(error)[:200])
        if candidates:
            raise NoReadableCheckpoint(
                f"{self.folder} holds {len(candidates)} checkpoint(s) and none can be loaded ({'; '.join(problems[:3])}); "
                "nothing was deleted. Move them away to start a fresh run, or point train.out elsewhere")
        return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointNotFound(FileNotFoundError):
    """`--checkpoint` names nothing that holds a checkpoint; the message says what it found."""


def resolve_checkpoint(given: str | Path) -> Path:
    """A checkpoint file from what a user passes: the file itself, a `last` pointer, a run's
    `checkpoints/` folder or the run folder (its newest readable checkpoint, `last` first)."""
    path = Path(given)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        checkpointer = Checkpointer(folder)
        pointer = folder / "last"
        if pointer.is_file() and (folder / pointer.read_text().strip()).is_file():
            return folder / pointer.read_text().strip()
        for candidate in checkpointer.existing():
            if readable(candidate):
                return candidate
        raise CheckpointNotFound(f"{given}: no readable step-*.pt checkpoint in {folder}")
    if path.name == "last" and path.is_file():
        named = path.parent / path.read_text().strip()
        if not named.is_file():
            raise CheckpointNotFound(f"{given} names {named.name}, which does not exist")
        return named
    if not path.is_file():
        raise CheckpointNotFound(f"{given}: no such checkpoint (a step-*.pt file, a `last` pointer, or a run folder)")
    return path


def load_model(path: str | Path):
    """A model from a checkpoint, for evaluation (weights_only=True; no code runs on load). `path`
    may be a checkpoint file, a `last` pointer, or a run folder (`resolve_checkpoint`)."""
    from trainer.model import build_model

    path = resolve_checkpoint(path)
    try:
        state = load_checkpoint(path)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file: say which
        raise CheckpointNotFound(f"{path}: cannot be loaded as a checkpoint ({type(error).__name__}: "
                                 f"{str(error)[:200]})") from None
    spec = state["model_spec"]
    model = build_model(spec["preset"], spec["vocab_size"], spec["image_size"], spec["max_text_tokens"],
                        spec.get("norm_pix_loss", True), spec.get("alignment", False))
    model.load_state_dict(state["model"])
    model.eval()
    return model, state
