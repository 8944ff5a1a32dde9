"""Setting a finished build aside while a new one replaces it, crash-safe at every step.

`mmae build --overwrite` (and `--retry-transient`, which rewrites the shards) moves the files
of the finished build in OUT into `OUT/.previous-build/` before the new build writes, and
either discards them when the new build has succeeded or moves them back when it fails. Only
files that build wrote move: what its manifest lists, the manifest, its report, tokenizer and
staging. Anything else in OUT stays where it is and is never touched.

Every step is one atomic action (a rename, or the journal written to a temporary name and
renamed), and `OUT/.previous-build/journal.json` says which phase is under way. Rerunning any
`mmae build` on OUT first finishes or undoes what an interrupted phase left (`recover`):

    setting_aside  -> undone: the finished build moves back; OUT is as before the command
    set_aside      -> a replacement is running or was killed: if OUT holds a new finished
                      build, the old one is discarded; a killed retry is undone; an
                      unfinished --overwrite keeps the old build aside until it succeeds
    restoring      -> finished: the new build's files are gone; the old ones come back
    discarding     -> finished: the old build's files go
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from typing import Any, Optional

from .staging import STAGING
from ..shards import join, write_json

log = logging.getLogger("mmae.build")

PREVIOUS = ".previous-build"
JOURNAL = "journal.json"
KIND_FOLDERS = ("paired", "image", "text", "rejects")
BUILD_FILES = ("build_report.json", "tokenizer.model")  # beside the manifest
# Names an mmae build gives the files it writes in the kind folders (shards and their temporaries).
_SHARD = re.compile(r"^part-(a\d{3}-)?\d{5}-of-\d{5}\.parquet$")  # a001-: added by `--append` number 1
_TEMPORARY = re.compile(r"^\.tmp-[0-9a-f]{32}-")


def is_build_file(relative: str) -> bool:
    """Is `relative` (a path in OUT) a name an mmae build writes?"""
    if relative in BUILD_FILES or relative == "manifest.json":
        return True
    folder, _, name = relative.partition("/")
    return folder in KIND_FOLDERS and "/" not in name and bool(_SHARD.match(name) or _TEMPORARY.match(name))


def _exists(fs, path: str) -> bool:
    return fs.exists(path) or fs.isdir(path)


def finished_build_files(fs, root: str, purpose: str) -> list[str]:
    """What the finished build in `root` wrote, the manifest first (moving it first makes OUT
    unfinished at once). A retry keeps its staging (it retries from it)."""
    manifest = json.loads(fs.cat_file(join(root, "manifest.json")))
    listed = [entry.get("path") for entry in manifest.get("shards", []) + manifest.get("rejects", [])
              if isinstance(entry, dict)]
    files = ["manifest.json"]
    files += sorted({path for path in listed if isinstance(path, str) and is_build_file(path)})
    files += [name for name in BUILD_FILES if fs.exists(join(root, name))]
    if purpose == "overwrite" and fs.isdir(join(root, STAGING)):
        files.append(STAGING)
    return [path for path in files if _exists(fs, join(root, path))]


# The three actions every phase is made of. Each is atomic on a local disk; tests interrupt
# the phases between them.


def _move(fs, source: str, target: str) -> None:
    if not _exists(fs, source):
        return  # moved already, by the run that was interrupted
    if _exists(fs, target):
        _delete(fs, target)  # a copy left by a move that was not atomic (object stores)
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    fs.mv(source, target, recursive=True)


def _delete(fs, path: str) -> None:
    if _exists(fs, path):
        fs.rm(path, recursive=True)


def _save_journal(fs, root: str, journal: Optional[dict[str, Any]]) -> None:
    path = join(root, PREVIOUS, JOURNAL)
    if journal is None:
        _delete(fs, path)
        _remove_empty_folders(fs, join(root, PREVIOUS))
    else:
        fs.makedirs(join(root, PREVIOUS), exist_ok=True)
        write_json(fs.unstrip_protocol(path) if hasattr(fs, "unstrip_protocol") else path, journal)


def _remove_empty_folders(fs, folder: str) -> None:
    """Folders under (and including) `folder` that hold nothing; a folder with any file stays."""
    if not fs.isdir(folder):
        return
    for path in sorted((entry for entry in fs.find(folder, withdirs=True) if fs.isdir(entry)),
                       key=len, reverse=True):
        if not fs.ls(path, detail=False):
            fs.rmdir(path)
    if fs.isdir(folder) and not fs.ls(folder, detail=False):
        fs.rmdir(folder)


def read_journal(fs, root: str) -> Optional[dict[str, Any]]:
    path = join(root, PREVIOUS, JOURNAL)
    if not fs.exists(path):
        if _exists(fs, join(root, PREVIOUS)):
            # Set aside by an mmae without a journal: every mmae-named file in it is the old build.
            found = [posixpath.relpath(path, join(root, PREVIOUS)) for path in fs.find(join(root, PREVIOUS))]
            files = sorted(path for path in found if is_build_file(path))
            if any(path.startswith(STAGING + "/") for path in found):
                files.append(STAGING)
            return {"phase": "set_aside", "purpose": "overwrite", "files": files}
        return None
    try:
        journal = json.loads(fs.cat_file(path))
    except ValueError:
        journal = None
    if not isinstance(journal, dict) or journal.get("phase") not in (
            "setting_aside", "set_aside", "restoring", "discarding") or not isinstance(journal.get("files"), list):
        raise RuntimeError(f"{path}: not a journal this mmae wrote; the build set aside in {join(root, PREVIOUS)} "
                           "was left as it is: move it back or away by hand")
    return journal


def set_aside(fs, root: str, purpose: str) -> None:
    """Move the finished build in `root` into OUT/.previous-build (purpose: overwrite | retry)."""
    files = finished_build_files(fs, root, purpose)
    journal = {"phase": "setting_aside", "purpose": purpose, "files": files}
    _save_journal(fs, root, journal)
    for relative in files:
        _move(fs, join(root, relative), join(root, PREVIOUS, relative))
    _save_journal(fs, root, {**journal, "phase": "set_aside"})


def _put_back(fs, root: str, journal: dict[str, Any]) -> None:
    """Move the set-aside files back, replacing what the new build wrote under the same names."""
    for relative in reversed(journal["files"]):  # the manifest last: OUT is finished only when whole
        _move(fs, join(root, PREVIOUS, relative), join(root, relative))
    _save_journal(fs, root, None)


def restore(fs, root: str) -> bool:
    """The replacement failed: remove what it wrote, put the old build back (True if there was one)."""
    journal = read_journal(fs, root)
    if journal is None:
        return False
    if journal["phase"] == "discarding":
        discard(fs, root)  # the replacement had succeeded
        return False
    if journal["phase"] == "set_aside":
        # What the new build wrote goes first (while the phase says set_aside, this may be
        # redone: the old build is all aside); from `restoring` on, only moves back are left.
        remove_unfinished(fs, root, keep_staging=journal["purpose"] == "retry")
        journal = {**journal, "phase": "restoring"}
        _save_journal(fs, root, journal)
    _put_back(fs, root, journal)
    return True


def discard(fs, root: str) -> None:
    """The replacement succeeded: the old build's files go (nothing else in OUT/.previous-build)."""
    journal = read_journal(fs, root)
    if journal is None:
        return
    if journal["phase"] in ("setting_aside", "restoring"):
        raise RuntimeError(f"{join(root, PREVIOUS)}: phase {journal['phase']}, not a finished replacement")
    journal = {**journal, "phase": "discarding"}
    _save_journal(fs, root, journal)
    for relative in journal["files"]:
        _delete(fs, join(root, PREVIOUS, relative))
    _save_journal(fs, root, None)


def recover(fs, root: str) -> None:
    """Finish or undo what an interrupted phase left (see the module's docstring)."""
    journal = read_journal(fs, root)
    if journal is None:
        return
    phase = journal["phase"]
    if phase == "setting_aside":
        log.warning("an interrupted --overwrite/--retry-transient had begun to set the build in %s aside; "
                    "it is back in place", root)
        _put_back(fs, root, journal)
    elif phase == "restoring":
        log.warning("finishing the restore of the build in %s that an interrupted run had begun", root)
        restore(fs, root)
    elif phase == "discarding" or fs.exists(join(root, "manifest.json")):
        discard(fs, root)  # the replacement had finished
    elif journal["purpose"] == "retry":
        log.warning("an interrupted --retry-transient left %s unfinished; the finished build is back in place", root)
        restore(fs, root)


def remove_unfinished(fs, root: str, keep_staging: bool = False) -> list[str]:
    """Remove what an unfinished mmae build wrote in `root` (shards, temporaries, report,
    tokenizer, staging); return the other files found in its folders, which stay."""
    kept = []
    for relative in BUILD_FILES + ("manifest.json",):
        _delete(fs, join(root, relative))
    for folder in KIND_FOLDERS:
        path = join(root, folder)
        if not fs.isdir(path):
            continue
        for name in fs.find(path, withdirs=False):
            relative = posixpath.relpath(name, root)
            if is_build_file(relative):
                _delete(fs, name)
            else:
                kept.append(relative)
        _remove_empty_folders(fs, path)
    if not keep_staging:
        _delete(fs, join(root, STAGING))
    return kept
