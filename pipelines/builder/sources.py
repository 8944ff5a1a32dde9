"""What a source is: its files (expanded from a path, a glob or a folder), the columns it needs,
and where its rows' urls may lead. The rows themselves are read by `readers`, one module per
format; records and rejects are made in `records`.
"""

from __future__ import annotations

import functools
import os
import posixpath
import zlib
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import fsspec
import pyarrow as pa
from .lines import default_cap
from .records import RowProblem
from .schemes import family_of
from .tablefiles import HeaderError, image_column_type_ok, open_parquet, read_header
from mmae.schemas.config import DataConfig, SourceConfig

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt")  # .txt: one text per line (kind: text)
TAR_SUFFIX = ".tar"  # a WebDataset shard (see webdataset.py)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, missing column): fails before any work."""


def _format_of(path: str) -> str:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in TABLE_SUFFIXES:
        if name.endswith(suffix):
            return "jsonl" if suffix == ".json" else suffix[1:]
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if path.lower().endswith(TAR_SUFFIX):
        return "tar"
    if path.lower().endswith((".tar.gz", ".tgz")):
        raise SourceError(f"{path}: a compressed tar cannot be read by member offset; decompress it (gunzip) first")
    raise SourceError(f"{path}: unknown file type (expected one of {', '.join(TABLE_SUFFIXES)}, optionally .gz, "
                      f"or a WebDataset {TAR_SUFFIX})")


@dataclass(frozen=True)
class SourceFile:
    """One file of a source, with the key prefix that keeps ids stable across machines."""

    path: str  # fsspec URL or local path
    relative: str  # path relative to the source root: the key prefix
    format: str  # jsonl | parquet | csv | tsv | image | tar


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def expand_source(source: SourceConfig) -> list[SourceFile]:
    """List a source's files; raise SourceError naming the path when there are none."""
    fs, root = fsspec.core.url_to_fs(source.path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol

    def to_url(path: str) -> str:
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    if _has_glob(source.path):
        matches = sorted(fs.glob(root))
        base = root[: min((root.find(ch) for ch in "*?[" if ch in root))]
        base = base.rsplit("/", 1)[0]
        files = [m for m in matches if not fs.isdir(m)]
        if not files:
            raise SourceError(f"source {source.name!r}: no files match {source.path}")
    elif fs.isdir(root):
        if source.kind == "text" or (source.kind == "paired" and not source.sidecar_captions):
            raise SourceError(
                f"source {source.name!r}: {source.path} is a folder; folders are read by kind: image sources, or "
                "kind: paired with sidecar_captions: true (NAME.txt beside NAME.jpg)"
            )
        base = root.rstrip("/")
        files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise SourceError(f"source {source.name!r}: no image files under {source.path}")
    elif fs.exists(root):
        base = root.rsplit("/", 1)[0]
        files = [root]
    else:
        raise SourceError(f"source {source.name!r}: {source.path} does not exist")

    out = []
    for path in files:
        relative = posixpath.relpath(path, base) if base else path
        fmt = _format_of(path)
        if fmt == "image" and source.kind == "text":
            raise SourceError(f"source {source.name!r}: {path} is an image; a kind: text source cannot list images")
        if fmt == "image" and source.kind == "paired" and not source.sidecar_captions:
            raise SourceError(f"source {source.name!r}: {path} is an image; kind: paired image folders need "
                              "sidecar_captions: true")
        if fmt == "txt" and source.kind != "text":
            raise SourceError(f"source {source.name!r}: {path} is a text file (one text per line); it can be "
                              "read by a kind: text source only")
        if fmt == "tar" and source.kind == "text":
            raise SourceError(f"source {source.name!r}: {path} is a WebDataset tar; use kind: paired or image")
        out.append(SourceFile(path=to_url(path), relative=relative, format=fmt))
    for source_file in out:
        if source_file.format in ("parquet", "csv", "tsv"):
            _check_columns(source, source_file)
    if source.image_column and any(source_file.format in ("image", "tar") for source_file in out):
        raise SourceError(f"source {source.name!r}: image_column names a column of table files; image folders "
                          "and WebDataset tars hold their images already")
    untabled = sorted({source_file.format for source_file in out if source_file.format in ("image", "tar", "txt")})
    if source.id_from != "line" and untabled:
        raise SourceError(f"source {source.name!r}: id_from: {source.id_from} applies to table files (JSONL, CSV, "
                          f"Parquet); {' and '.join(untabled)} files already have ids from their paths or lines")
    return out


def input_folders(source: SourceConfig) -> list[str]:
    """Folders a source reads as a whole: an image folder, or the fixed part of a `**` glob."""
    fs, root = fsspec.core.url_to_fs(source.path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if _has_glob(source.path):
        if "**" not in source.path:
            return []
        base = root[: min(root.find(ch) for ch in "*?[" if ch in root)].rsplit("/", 1)[0]
        return [prefix + (base or "/")]
    return [prefix + root] if fs.isdir(root) else []


def required_columns(source: SourceConfig) -> list[str]:
    image = source.image_column or source.url_column
    if source.kind == "paired":
        columns = [image, source.caption_column]
    elif source.kind == "image":
        columns = [image]
    else:
        columns = [source.text_column]
    if source.label_column:
        columns.append(source.label_column)
    return columns


def _check_columns(source: SourceConfig, source_file: SourceFile) -> None:
    """Columnar files declare their columns up front: a missing one is a config error, not N rejects."""
    try:
        with fsspec.open(source_file.path, "rb", compression="infer") as handle:
            if source_file.format == "parquet":
                with open_parquet(handle) as parquet:
                    names = parquet.schema_arrow.names
                    if source.image_column in names:
                        data_type = parquet.schema_arrow.field(source.image_column).type
                        if not image_column_type_ok(data_type):
                            raise SourceError(f"source {source.name!r}: {source_file.path}: image_column "
                                              f"{source.image_column!r} is {data_type}, not binary or a struct "
                                              "with a binary `bytes` field")
            else:
                names = read_header(handle, source_file)
    except HeaderError as error:
        raise SourceError(str(error)) from None
    except (OSError, EOFError, zlib.error, ValueError, pa.ArrowException) as error:
        if isinstance(error, SourceError):
            raise
        raise SourceError(f"source {source.name!r}: cannot read {source_file.path}: {error}") from None
    missing = [column for column in required_columns(source) if column not in names]
    if missing:
        raise SourceError(
            f"source {source.name!r}: {source_file.path} has no column(s) {', '.join(missing)} "
            f"(columns: {', '.join(names)})"
        )


@functools.lru_cache(maxsize=256)
def _real_folder(folder: str) -> str:
    """A source file's folder with links resolved: once per folder, not once per row."""
    return os.path.realpath(folder)


def _is_inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def resolve_url(url: str, source: SourceConfig, source_file: SourceFile) -> str:
    """Where a row's url may lead (raises RowProblem): http(s) always (the address guard checks
    the host later); a relative path inside the source file's own folder (symlinks resolved);
    local files anywhere only with `allow_local_files`; object stores only with
    `allow_object_stores`. Nothing is opened here: a refusal says nothing about the file."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise RowProblem("bad_url", "control character (NUL, newline...) in the url")
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise RowProblem("bad_url", str(error)) from None
    scheme = parts.scheme.lower()
    if len(scheme) > 1:  # one letter: a Windows drive
        family = family_of(scheme)  # the one table the fetcher routes with too (schemes.py)
        if family == "http":
            return url
        if family == "object_store":
            if not source.allow_object_stores:
                raise RowProblem("url_not_allowed", f"{scheme}:// urls need allow_object_stores: true on the source")
            return scheme + url[len(scheme):]
        if family == "local":
            if not source.allow_local_files:
                raise RowProblem("url_not_allowed", "local files outside the source's folder need "
                                 "allow_local_files: true on the source")
            return parts.path or url[len(scheme) + 3:]
        raise RowProblem("bad_url", f"unsupported scheme {scheme!r} (http, https, or a path)")
    if source.base_url:
        base = source.base_url if source.base_url.endswith("/") else source.base_url + "/"
        return resolve_url(urljoin(base, url), source.model_copy(update={"base_url": None}), source_file)
    if url.startswith("/") or (len(scheme) == 1 and url[1:2] == ":"):
        if not source.allow_local_files:
            raise RowProblem("url_not_allowed", "absolute paths need allow_local_files: true on the source")
        return url
    folder = source_file.path.rsplit("/", 1)[0] if "/" in source_file.path else "."
    if "://" in folder:  # a source file in an object store: paths beside it, in the same store
        joined = posixpath.normpath(url)
        if joined.startswith("../") or joined == "..":
            raise RowProblem("url_not_allowed", "relative paths may not leave the source file's folder")
        return f"{folder}/{joined}"
    joined = posixpath.normpath(posixpath.join(folder, url))
    if not source.allow_local_files:
        if not _is_inside(os.path.realpath(joined), _real_folder(folder)):
            raise RowProblem("url_not_allowed", "relative paths (and links) may not leave the source file's "
                             "folder without allow_local_files: true on the source")
    return joined


def row_cap(data: DataConfig, source: SourceConfig) -> int:
    """The longest table line (bytes) a source's reader holds; longer ones are `row_too_long`."""
    if data.max_row_bytes:
        return data.max_row_bytes
    return default_cap(data.text.max_chars, data.download.max_bytes if source.image_column else 0)
