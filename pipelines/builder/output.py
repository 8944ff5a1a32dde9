"""The output folder's state: fresh, an unfinished build to resume, or a finished build.

An output folder is only ever written by one build, and --overwrite replaces only what an mmae
build wrote: the folder must be recognisably one (`staging/build.json`, or a manifest or report
in mmae's shape), it may neither hold nor sit inside any input, and the finished build it holds
is set aside in `OUT/.previous-build/` until the new build has succeeded (restored if it fails),
crash-safe at every step (`replace`). Files in OUT that no mmae build wrote are never removed.

`OUT/staging/build.json` records the *staging fingerprint*: a hash of every setting that decides
what a chunk file contains (sources, cleaning, download policy, image processing, chunk_rows).
Settings that only change how fast it goes (threads, timeouts, retries) or what happens after
the chunks (tokenizer, shard sizes) may change between runs; the others may not, since the
committed chunks would no longer match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from enum import Enum
from typing import Any, Iterable

import fsspec
from . import replace
from .quality import is_default
from ..outputs import location, within
from .staging import STAGING
from ..shards import join, write_json
from mmae.schemas.config import DataConfig

log = logging.getLogger("mmae.build")

# What an mmae build writes into its output folder (and so what --overwrite may replace).
OUTPUT_ENTRIES = ("paired", "image", "text", "rejects", "manifest.json", "build_report.json", "tokenizer.model", STAGING)
STATE_FILE = "build.json"
STAGING_DOWNLOAD_KEYS = (
    "max_bytes", "max_redirects", "allow_private_addresses", "allowed_networks", "user_agent_token",
    "disallowed_header_directives",
)


class BuildError(RuntimeError):
    """The build cannot start or finish; the message says why."""


class Mode(str, Enum):
    FRESH = "fresh"
    RESUME = "resume"
    RETRY = "retry"  # a finished build: redo only the transient rejects


def staging_settings(config: DataConfig) -> dict[str, Any]:
    dumped = config.model_dump(mode="json")
    return {
        "sources": dumped["sources"],
        "image": dumped["image"],
        "text": {key: dumped["text"][key] for key in ("min_words", "max_chars")},
        "download": {key: dumped["download"][key] for key in STAGING_DOWNLOAD_KEYS},
        "chunk_rows": dumped["chunk_rows"],
        "max_row_bytes": dumped["max_row_bytes"],
        # Only when set: an unfinished build from before the quality rules resumes unchanged.
        **({} if is_default(config.quality) else {"quality": dumped["quality"]}),
    }


def fingerprint(config: DataConfig) -> str:
    payload = json.dumps(staging_settings(config), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


def _read_state(fs, root: str) -> dict[str, Any] | None:
    path = join(root, STAGING, STATE_FILE)
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            changed += _changed_keys(old[key], new[key], name + ".")
        elif old.get(key) != new.get(key):
            changed.append(name)
    return changed


def _json(fs, path: str) -> Any:
    try:
        return json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None


def is_mmae_build(fs, root: str) -> bool:
    """Does this folder hold what an mmae build wrote (finished or not)?"""
    state = _json(fs, join(root, STAGING, STATE_FILE))
    if isinstance(state, dict) and "fingerprint" in state:
        return True
    manifest = _json(fs, join(root, "manifest.json"))
    if isinstance(manifest, dict) and {"schema_version", "shards", "config"} <= set(manifest):
        return True
    report = _json(fs, join(root, "build_report.json"))
    return isinstance(report, dict) and {"read", "written", "rejected", "balanced"} <= set(report)


def check_apart_from_inputs(config: DataConfig, inputs: Iterable[str], input_folders: Iterable[str]) -> None:
    """Refuse an output that holds an input file or folder, or sits inside an input folder: a
    rebuild would read its own output, and --overwrite would delete the input."""
    output = location(config.output)
    for url in inputs:
        if within(location(url), output):
            raise BuildError(f"the output folder {config.output} holds the input {url}; choose an output "
                             "folder outside every source")
    for url in input_folders:
        folder = location(url)
        if within(folder, output) or within(output, folder):
            raise BuildError(f"the output folder {config.output} and the input folder {url} overlap; choose an "
                             "output folder outside every source")


def restore_previous(config: DataConfig) -> bool:
    """The new build failed: put the build it was replacing back (True if there was one)."""
    fs, root = fsspec.core.url_to_fs(config.output)
    return replace.restore(fs, root)


def discard_previous(config: DataConfig) -> None:
    """The new build succeeded: the one it replaced goes."""
    fs, root = fsspec.core.url_to_fs(config.output)
    replace.discard(fs, root)


def _check_folder(fs, root: str, output: str) -> None:
    if fs.exists(root) and not fs.isdir(root):
        raise BuildError(f"the output {output} is a file, not a folder: choose a folder (it is created if missing)")
    parent = posixpath.dirname(root.rstrip("/"))
    while parent and parent != "/" and not fs.exists(parent):
        parent = posixpath.dirname(parent)
    if parent and fs.exists(parent) and not fs.isdir(parent):
        raise BuildError(f"the output {output} cannot be created: {parent} is a file, not a folder")


def prepare_output(config: DataConfig, overwrite: bool = False, retry_transient: bool = False) -> Mode:
    """Decide fresh / resume / retry, refusing anything that would mix two different builds."""
    fs, root = fsspec.core.url_to_fs(config.output)
    _check_folder(fs, root, config.output)
    try:
        replace.recover(fs, root)  # whatever an interrupted replacement left is finished or undone first
    except RuntimeError as error:
        raise BuildError(str(error)) from None
    state = _read_state(fs, root)
    finished = fs.exists(join(root, "manifest.json"))
    settings = staging_settings(config)
    wanted = fingerprint(config)
    if retry_transient:
        if not finished:
            raise BuildError(f"{config.output}: no finished build to retry (run the build first; an unfinished "
                             "build resumes with the same command)")
        if state is None:
            raise BuildError(f"{config.output}: its staging area is gone (data.keep_staging: false?), so the "
                             "failed rows cannot be retried; rebuild with --overwrite")
        if state.get("fingerprint") != wanted:
            changed = _changed_keys(state.get("settings", {}), settings)
            raise BuildError(f"{config.output}: built with other settings ({', '.join(changed) or 'unknown'}); "
                             "retry with the config it was built with")
        # The shards are rewritten: the finished build is set aside until the retry succeeds,
        # so OUT never holds an old manifest beside new shards.
        replace.set_aside(fs, root, "retry")
        return Mode.RETRY
    present = [entry for entry in OUTPUT_ENTRIES if fs.exists(join(root, entry))]
    if present and not is_mmae_build(fs, root):
        raise BuildError(f"{config.output} holds {', '.join(present)} that no mmae build wrote (not an mmae build); "
                         "nothing was changed: choose another output folder")
    if overwrite:
        if finished:
            replace.set_aside(fs, root, "overwrite")
        kept = replace.remove_unfinished(fs, root)
        if kept:
            log.warning("--overwrite keeps %d file(s) in %s that no mmae build wrote: %s", len(kept), config.output,
                        ", ".join(kept[:10]) + (" ..." if len(kept) > 10 else ""))
    elif finished:
        raise BuildError(f"{config.output} already holds a finished build; pass --overwrite to replace it, or "
                         "--retry-transient to retry its timeouts, connection errors, 5xx and 429")
    elif state is not None:
        if state.get("fingerprint") != wanted:
            changed = _changed_keys(state.get("settings", {}), settings)
            raise BuildError(
                f"{config.output} holds an unfinished build with other settings ({', '.join(changed) or 'unknown'}); "
                "use the same settings to resume it, or pass --overwrite to start over")
        log.info("resuming the unfinished build in %s", config.output)
        return Mode.RESUME
    else:
        if present:
            raise BuildError(f"{config.output} already holds build outputs ({', '.join(present)}); "
                             "pass --overwrite to replace them")
    fs.makedirs(join(root, STAGING), exist_ok=True)
    write_json(join(config.output, STAGING, STATE_FILE), {"fingerprint": wanted, "settings": settings})
    return Mode.FRESH
