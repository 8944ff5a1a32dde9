"""Where a command may write: never into a dataset folder, never onto or around what it reads.

`train.out`, `mmae export --out` and `mmae embed --out` are refused, naming both, when the
output (links resolved, for local paths) is or lies inside a built dataset (a folder holding an
mmae `manifest.json`) or an input folder, or when it is or holds an input file. A dataset is
what every later run reads: a checkpoint written into it, or a `tokenizer.model` truncated by a
copy onto itself, breaks it for good.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Iterable, Optional

import fsspec


class OutputError(ValueError):
    """The output would land in what the command reads or in a dataset; the message names both."""


def location(url: str) -> tuple[str, str]:
    """(protocol, normalised absolute path) of a local path or fsspec URL, links resolved locally."""
    fs, path = fsspec.core.url_to_fs(str(url))
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return "file", os.path.realpath(path)
    return protocol, posixpath.normpath("/" + path.lstrip("/"))


def within(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    """Is `inner` the same place as `outer`, or inside it?"""
    return inner[0] == outer[0] and (inner[1] == outer[1] or inner[1].startswith(outer[1].rstrip("/") + "/"))


def _is_dataset(folder: str) -> bool:
    manifest = os.path.join(folder, "manifest.json")
    try:
        with open(manifest, "rb") as handle:
            data = json.loads(handle.read(1 << 22))
    except (OSError, ValueError, RecursionError):
        return os.path.isfile(os.path.join(folder, "staging", "build.json"))
    return isinstance(data, dict) and "shards" in data and "schema_version" in data


def enclosing_dataset(url: str) -> Optional[str]:
    """The built dataset folder a local path is in (or is), if any."""
    protocol, path = location(url)
    if protocol != "file":
        return None
    folder = path
    while True:
        if os.path.isdir(folder) and _is_dataset(folder):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def check_output(output: str, what: str, inputs: Iterable[str] = (), folders: Iterable[str] = ()) -> None:
    """Refuse `output` (a file or folder) that is in a dataset, is or holds an input file, or
    lies in (or holds) an input folder. `what` names the setting in the message."""
    place = location(output)
    dataset = enclosing_dataset(output)
    if dataset is not None:
        raise OutputError(f"{what} {output} is inside the dataset {dataset}; datasets are only read: write "
                          "somewhere else")
    for url in inputs:
        if url and within(location(url), place):
            raise OutputError(f"{what} {output} is or holds the input {url}; choose another {what}")
    for url in folders:
        if url and (within(place, location(url)) or within(location(url), place)):
            raise OutputError(f"{what} {output} and the input folder {url} overlap; choose another {what}")
