"""The output folder's state: fresh, an unfinished build to resume, or a finished build.

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
from enum import Enum
from typing import Any

import fsspec

from pipelines.builder.staging import STAGING
from pipelines.shards import join, write_json
from schemas.config import DataConfig

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


def remove_entries(fs, root: str) -> None:
    for entry in OUTPUT_ENTRIES:
        path = join(root, entry)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def prepare_output(config: DataConfig, overwrite: bool = False, retry_transient: bool = False) -> Mode:
    """Decide fresh / resume / retry, refusing anything that would mix two different builds."""
    fs, root = fsspec.core.url_to_fs(config.output)
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
        return Mode.RETRY
    if overwrite:
        remove_entries(fs, root)
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
        present = [entry for entry in OUTPUT_ENTRIES if fs.exists(join(root, entry))]
        if present:
            raise BuildError(f"{config.output} already holds build outputs ({', '.join(present)}); "
                             "pass --overwrite to replace them")
    fs.makedirs(join(root, STAGING), exist_ok=True)
    write_json(join(config.output, STAGING, STATE_FILE), {"fingerprint": wanted, "settings": settings})
    return Mode.FRESH
