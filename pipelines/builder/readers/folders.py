"""Image folders: one record per image file, its caption from NAME.txt beside it (kind: paired,
`sidecar_captions`), its label from its folder (`label_from_folder`). Links out of the folder
are refused unless the source allows local files; a FIFO named NAME.txt is never opened."""

from __future__ import annotations

import os
import posixpath
from typing import Any, Iterator

import fsspec
from ..records import new_record, reject
from ..sources import SourceFile
from ...localfiles import NotARegularFile, inside, read_regular_file
from mmae.schemas.config import SourceConfig

MAX_SIDECAR_BYTES = 1 << 20


def read_image_file(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    """One file of an image folder; its caption from NAME.txt beside it, its label from its folder."""
    record = new_record(source.name, source.kind, source_file.relative)
    record["url"] = source_file.path
    if source.label_from_folder:
        folder = posixpath.dirname(source_file.relative)
        record["label"] = posixpath.basename(folder) if folder else None
    local = "://" not in source_file.path
    root = source_file.path[: len(source_file.path) - len(source_file.relative)] or "."
    if local and not source.allow_local_files and not inside(source_file.path, root):
        yield reject(record, "url_not_allowed", "the image is a link to a file outside the source's folder "
                     "(allow_local_files: true on the source follows it)")
        return
    if source.kind == "paired":
        sidecar = source_file.path.rsplit(".", 1)[0] + ".txt"
        if local and not source.allow_local_files and os.path.lexists(sidecar) and not inside(sidecar, root):
            yield reject(record, "url_not_allowed", f"the caption file {posixpath.basename(sidecar)} is a link to a "
                         "file outside the source's folder (allow_local_files: true on the source follows it)")
            return
        try:
            raw = _read_sidecar(sidecar)
        except FileNotFoundError:
            yield reject(record, "missing_column", f"no caption file {posixpath.basename(sidecar)} beside the image")
            return
        except (NotARegularFile, IsADirectoryError):
            yield reject(record, "not_a_file", f"{posixpath.basename(sidecar)} is not a regular file (a folder, "
                         "FIFO or device)")
            return
        except OSError as error:
            yield reject(record, "bad_caption", f"{posixpath.basename(sidecar)}: {error}")
            return
        if len(raw) > MAX_SIDECAR_BYTES:
            yield reject(record, "bad_caption", f"{posixpath.basename(sidecar)} is larger than {MAX_SIDECAR_BYTES} bytes")
            return
        try:
            record["caption"] = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            yield reject(record, "invalid_utf8", f"{posixpath.basename(sidecar)}: {error}")
            return
    yield record


def _read_sidecar(path: str) -> bytes:
    """A caption file, at most MAX_SIDECAR_BYTES + 1 bytes (more means too large); a local one
    only if it is a regular file (a FIFO named NAME.txt must not stall the reader)."""
    if "://" not in path:
        data, size = read_regular_file(path, MAX_SIDECAR_BYTES)
        if size > MAX_SIDECAR_BYTES:
            raise OSError(f"larger than {MAX_SIDECAR_BYTES} bytes")
        return data
    with fsspec.open(path, "rb") as handle:
        return handle.read(MAX_SIDECAR_BYTES + 1)
