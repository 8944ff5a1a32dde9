"""Reading input corpora: expand each source to files, stream its rows as records.

A record is a plain dict (picklable, cheap) with at least `id`, `source`, `kind`, `key`.
Rows that cannot be used at all (bad JSON, missing column, invalid UTF-8) are emitted as
records carrying a `reason`, so they end in `rejects/` and are counted, never dropped.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import posixpath
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional
from urllib.parse import urljoin, urlsplit

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from mmae.pipelines.builder import webdataset
from mmae.pipelines.builder.lines import default_cap, lines
from mmae.pipelines.localfiles import NotARegularFile, inside, read_regular_file
from mmae.schemas.config import DataConfig, SourceConfig
from mmae.schemas.shard import reject_detail

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt")  # .txt: one text per line (kind: text)
TAR_SUFFIX = ".tar"  # a WebDataset shard (see webdataset.py)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FETCHABLE_SCHEMES = ("http", "https")
LOCAL_SCHEMES = ("file", "local")
MAX_SIDECAR_BYTES = 1 << 20
# Read through fsspec with this machine's credentials: only where a source allows it.
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hdfs", "webhdfs", "oss", "r2", "memory")


# The tagged output every stage routes its rejects to (rows built by `reject` below).
REJECTED = "rejected"


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, missing column): fails before any work."""


def row_id(source_name: str, key: str) -> str:
    """Stable id: a hash of the source name and the row's key within the source."""
    return hashlib.blake2b(f"{source_name}\x00{key}".encode(), digest_size=10).hexdigest()


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


class RowProblem(ValueError):
    """One row cannot be used: it becomes a reject with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
        if scheme in FETCHABLE_SCHEMES:
            return url
        if scheme in OBJECT_STORE_SCHEMES:
            if not source.allow_object_stores:
                raise RowProblem("url_not_allowed", f"{scheme}:// urls need allow_object_stores: true on the source")
            return scheme + url[len(scheme):]
        if scheme in LOCAL_SCHEMES:
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


def _text(value: Any, column: str, reason: str) -> Optional[str]:
    """A text cell: str, or bytes that must be UTF-8 (binary columns). Anything else is `reason`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError is handled by the caller
    raise RowProblem(reason, f"{column!r} is {type(value).__name__}, not text")


def _label(value: Any, column: str) -> Optional[str]:
    """Labels may be class numbers too; objects and lists are not labels."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _text(value, column, "bad_label")


def _base_record(source: SourceConfig, key: str) -> dict[str, Any]:
    return {"id": row_id(source.name, key), "source": source.name, "kind": source.kind, "key": key}


def reject(record: dict[str, Any], reason: str, detail: str = "") -> dict[str, Any]:
    """Turn a record into a reject (keeps id/source/kind/key/url)."""
    url = record.get("url")
    return {
        "id": record["id"],
        "source": record["source"],
        "kind": record["kind"],
        "key": record["key"],
        "url": url if isinstance(url, str) else None,
        "reason": reason,
        "detail": reject_detail(detail),
    }


def _record_from_row(
    source: SourceConfig, source_file: SourceFile, key: str, row: dict[str, Any], where: str = ""
) -> dict[str, Any]:
    """A parsed row as a record, or a reject: no value a stranger can put in a row raises."""
    record = _base_record(source, key)
    try:
        record = _fill_record(record, source, source_file, row)
        if source.id_from != "line" and "reason" not in record:
            record["id"] = row_id(source.name, _identity(source, record, row))
        return record
    except UnicodeDecodeError as error:
        return reject(record, "invalid_utf8", f"{where + ': ' if where else ''}{error}")
    except RowProblem as problem:
        return reject(record, problem.reason, problem.detail)
    except Exception as error:  # noqa: BLE001 - any other failure is this row's, not the build's
        return reject(record, "bad_row", f"{where + ': ' if where else ''}{_error_text(error)}")


def _identity(source: SourceConfig, record: dict[str, Any], row: dict[str, Any]) -> str:
    """The key of `source.id_from` (the id of a reject stays its line's)."""
    if source.id_from == "column":
        value = row.get(source.id_column)
        if value is None or isinstance(value, (dict, list)):
            raise RowProblem("missing_column", f"no usable {source.id_column!r} value (id_from: column)")
        return str(value)
    if source.id_from == "url_path":  # the url as the row gives it (relative ones before base_url)
        written = row.get(source.url_column)
        parts = urllib.parse.urlsplit(written.strip() if isinstance(written, str) else record["url"])
        return parts.path + (f"?{parts.query}" if parts.query else "")
    return record["url"]


def _fill_record(record: dict[str, Any], source: SourceConfig, source_file: SourceFile,
                 row: dict[str, Any]) -> dict[str, Any]:
    if source.kind in ("paired", "image") and source.image_column:
        problem = _inline_image(record, row.get(source.image_column), source, source_file)
        if problem is not None:
            return problem
    elif source.kind in ("paired", "image"):
        url = _text(row.get(source.url_column), source.url_column, "bad_url")
        if url is None or not url.strip():
            return reject(record, "missing_column", f"no {source.url_column!r} value")
        record["url"] = url.strip()
        record["url"] = resolve_url(record["url"], source, source_file)
    if source.kind == "paired":
        caption = _text(row.get(source.caption_column), source.caption_column, "bad_caption")
        if caption is None:
            return reject(record, "missing_column", f"no {source.caption_column!r} value")
        record["caption"] = caption
    if source.kind == "text":
        text = _text(row.get(source.text_column), source.text_column, "bad_caption")
        if text is None:
            return reject(record, "missing_column", f"no {source.text_column!r} value")
        record["caption"] = text
    if source.label_column:
        record["label"] = _label(row.get(source.label_column), source.label_column)
    return record


def _inline_image(record: dict[str, Any], value: Any, source: SourceConfig, source_file: SourceFile):
    """Point the record at its image in the source itself (a reject if the row has none)."""
    column = source.image_column
    where = f"{source_file.path}#{record['key'].rpartition(':')[2]}"
    if isinstance(value, dict):  # {bytes, path}: Hugging Face datasets' Image feature
        value = value.get("bytes")
    if value is None or value == "" or value == b"":
        return reject(record, "missing_column", f"no image bytes in {column!r}")
    if source_file.format == "parquet":
        if not isinstance(value, bytes):
            return reject(record, "bad_row", f"{column!r} is {type(value).__name__}, not bytes")
        record["url"] = where
        record["locator"] = {"parquet": source_file.path, "row": int(record["key"].rpartition(":")[2]) - 1,
                             "column": column}
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return reject(record, "bad_row", f"{column!r} is not base64 text")
    if not isinstance(value, str):
        return reject(record, "bad_row", f"{column!r} is {type(value).__name__}, not base64 text")
    record["url"] = where
    record["locator"] = {"base64": value}
    return None


def _read_image_file(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    """One file of an image folder; its caption from NAME.txt beside it, its label from its folder."""
    record = _base_record(source, source_file.relative)
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


def _read_tar(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    """One WebDataset tar: a record per sample, its image left in the tar (`locator`)."""
    for sample in webdataset.samples(source_file.path):
        record = _base_record(source, f"{source_file.relative}#{sample.key}")
        record["url"] = f"{source_file.path}#{sample.key}"
        if sample.problems:
            yield reject(record, "bad_row", "; ".join(sample.problems))
            continue
        image = sample.image
        if image is None:
            found = ", ".join(sorted(set(sample.texts) | set(sample.images)) + sample.not_read) or "nothing"
            yield reject(record, "missing_column", f"no {'/'.join(webdataset.IMAGE_EXTENSIONS)} member (has {found})")
            continue
        record["locator"] = {"tar": source_file.path, "offset": image[1], "size": image[2]}
        try:
            if source.kind == "paired":
                if "txt" not in sample.texts:
                    yield reject(record, "missing_column", "no txt member (the caption)")
                    continue
                record["caption"] = sample.texts["txt"].decode("utf-8-sig")
            if source.label_column:
                record["label"] = _sample_label(sample, source.label_column)
        except UnicodeDecodeError as error:
            yield reject(record, "invalid_utf8", str(error))
            continue
        except RowProblem as problem:
            yield reject(record, problem.reason, problem.detail)
            continue
        except Exception as error:  # noqa: BLE001 - e.g. a json member nested too deep: this sample's
            yield reject(record, "bad_row", _error_text(error))
            continue
        yield record


def _sample_label(sample: "webdataset.Sample", column: str) -> Optional[str]:
    """The label: `column` of the sample's json member, else its cls member."""
    if "json" in sample.texts:
        try:
            extra = json.loads(sample.texts["json"])
        except (ValueError, RecursionError) as error:
            raise RowProblem("bad_row", f"json member: {error}") from None
        if isinstance(extra, dict) and column in extra:
            return _label(extra[column], column)
    if "cls" in sample.texts:
        return sample.texts["cls"].decode("utf-8").strip()
    return None


def row_cap(data: DataConfig, source: SourceConfig) -> int:
    """The longest table line (bytes) a source's reader holds; longer ones are `row_too_long`."""
    if data.max_row_bytes:
        return data.max_row_bytes
    return default_cap(data.text.max_chars, data.download.max_bytes if source.image_column else 0)


def read_source_file(source: SourceConfig, source_file: SourceFile, cap: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Stream one file's rows as records (or rejects). Keys are `relative:row` (1-based rows:
    the line for JSONL, the row among non-blank lines for CSV/TSV), `relative#sample` for
    WebDataset tars, the file's path for image folders. No row, however hostile, raises: it
    becomes a reject naming its line."""
    if source_file.format == "image":
        yield from _read_image_file(source, source_file)
        return
    if source_file.format == "tar":
        yield from _read_tar(source, source_file)
        return
    if source_file.format == "jsonl":
        yield from _read_jsonl(source, source_file, cap)
    elif source_file.format == "txt":
        yield from _read_txt(source, source_file, cap)
    elif source_file.format == "parquet":
        yield from _read_parquet(source, source_file)
    else:
        yield from _read_csv(source, source_file, cap)


def _error_text(error: BaseException) -> str:
    """An exception as a deterministic one-line detail (no object addresses)."""
    text = reject_detail(str(error)) or type(error).__name__
    return f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text


def _too_long(source: SourceConfig, key: str, line_number: int, cap: int) -> dict[str, Any]:
    return reject(_base_record(source, key), "row_too_long",
                  f"line {line_number} is longer than {cap:,} bytes (data.max_row_bytes); it was not read")


def _read_jsonl(source: SourceConfig, source_file: SourceFile, cap: int) -> Iterator[dict[str, Any]]:
    with fsspec.open(source_file.path, "rb", compression="infer") as handle:
        for line_number, raw_line in lines(handle, cap):
            key = f"{source_file.relative}:{line_number}"
            if raw_line is None:
                yield _too_long(source, key, line_number, cap)
                continue
            if not raw_line.strip():
                continue  # blank lines are not rows
            yield _jsonl_record(source, source_file, key, line_number, raw_line)


def _read_txt(source: SourceConfig, source_file: SourceFile, cap: int) -> Iterator[dict[str, Any]]:
    """A plain text corpus: every non-blank line is one text (the most common format of text
    corpora). Keys are lines, as for JSONL."""
    with fsspec.open(source_file.path, "rb", compression="infer") as handle:
        for line_number, raw_line in lines(handle, cap):
            key = f"{source_file.relative}:{line_number}"
            if raw_line is None:
                yield _too_long(source, key, line_number, cap)
                continue
            if not raw_line.strip():
                continue
            record = _base_record(source, key)
            try:
                record["caption"] = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield reject(record, "invalid_utf8", f"line {line_number}: {error}")
                continue
            yield record


def _jsonl_record(source: SourceConfig, source_file: SourceFile, key: str, line_number: int,
                  raw_line: bytes) -> dict[str, Any]:
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        return reject(_base_record(source, key), "invalid_utf8", f"line {line_number}: {error}")
    try:
        row = json.loads(line)
    except Exception as error:  # noqa: BLE001
        # JSONDecodeError, and what the parser raises on legal-looking input: nesting deeper
        # than the interpreter's stack (RecursionError), numbers too long to convert.
        return reject(_base_record(source, key), "bad_row", f"line {line_number}: {_error_text(error)}")
    if not isinstance(row, dict):
        return reject(_base_record(source, key), "bad_row", f"line {line_number}: not a JSON object")
    return _record_from_row(source, source_file, key, row, f"line {line_number}")


def open_parquet(handle) -> pq.ParquetFile:
    """A Parquet file read a page at a time (buffered), so memory follows the batch size, not
    the size of the file's row groups."""
    return pq.ParquetFile(handle, buffer_size=1 << 20, pre_buffer=False)


def _read_parquet(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    columns = required_columns(source)
    image_column = source.image_column
    with fsspec.open(source_file.path, "rb") as handle, open_parquet(handle) as parquet:
        row_number = 0
        for group in range(parquet.metadata.num_row_groups):
            group_rows = parquet.metadata.row_group(group).num_rows
            first = row_number
            try:
                # With the images in the file, batches are small and the image column never
                # becomes Python objects: the reader only needs to know which rows have bytes.
                for batch in parquet.iter_batches(batch_size=256 if image_column else 4096, row_groups=[group],
                                                  columns=columns):
                    present = _image_present(batch.column(image_column)) if image_column else None
                    rows = batch.drop_columns([image_column]).to_pylist() if image_column else batch.to_pylist()
                    for index, row in enumerate(rows):
                        row_number += 1
                        if present is not None:
                            row[image_column] = b"\x01" if present[index] else None
                        yield _record_from_row(source, source_file, f"{source_file.relative}:{row_number}", row,
                                               f"row {row_number}")
            except Exception as error:  # noqa: BLE001 - a damaged row group (or a value Python cannot hold)
                # Its unread rows are rejects naming it; the next one is read.
                for row_number in range(row_number + 1, first + group_rows + 1):
                    yield reject(_base_record(source, f"{source_file.relative}:{row_number}"), "bad_row",
                                 f"row group {group}: {_error_text(error)}")
                row_number = first + group_rows


def image_column_type_ok(data_type: pa.DataType) -> bool:
    if pa.types.is_struct(data_type):
        return data_type.get_field_index("bytes") >= 0 and image_column_type_ok(data_type.field("bytes").type)
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)


def _image_present(column: pa.Array) -> list[bool]:
    """Per row: does the image column hold some bytes?"""
    if pa.types.is_struct(column.type):
        valid = pc.is_valid(column)
        column = pc.struct_field(column, "bytes")
        valid = pc.and_(valid, pc.is_valid(column))
    else:
        valid = pc.is_valid(column)
    nonempty = pc.fill_null(pc.greater(pc.binary_length(column), 0), False)
    return pc.and_(pc.fill_null(valid, False), nonempty).to_pylist()


def read_header(handle, source_file: SourceFile) -> list[str]:
    """Column names as people write them: a byte-order mark, spaces after the delimiter and
    quotes are not part of a name (`url, caption` names `caption`)."""
    line = handle.readline(1 << 20).decode("utf-8-sig", errors="replace")
    names = [name.strip() for name in next(csv.reader([line.rstrip("\r\n")], delimiter=_delimiter(source_file),
                                                      skipinitialspace=True), [])]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceError(f"{source_file.path}: the header repeats column(s) {', '.join(repeated)}")
    return names


def _delimiter(source_file: SourceFile) -> str:
    return "\t" if source_file.format == "tsv" else ","


def csv_quoted(source: SourceConfig, source_file: SourceFile) -> bool:
    """Are quotes syntax in this file? (`quoting`; by default yes in CSV, no in TSV)."""
    if source.quoting is not None:
        return source.quoting == "standard"
    return source_file.format == "csv"


def _read_csv(source: SourceConfig, source_file: SourceFile, cap: int) -> Iterator[dict[str, Any]]:
    """One row per non-blank line after the header: a quote never spans lines, so an unclosed
    one costs its own line (a bad_row), never the lines after it."""
    columns = required_columns(source)
    delimiter = _delimiter(source_file)
    quoting = csv.QUOTE_MINIMAL if csv_quoted(source, source_file) else csv.QUOTE_NONE
    with fsspec.open(source_file.path, "rb", compression="infer") as handle:
        names = read_header(handle, source_file)
        where = {name: names.index(name) for name in columns}
        row_number = 0
        for line_number, raw_line in lines(handle, cap):
            line_number += 1  # the header was line 1
            if raw_line is not None and not raw_line.strip():
                continue  # blank lines are not rows
            row_number += 1
            key = f"{source_file.relative}:{row_number}"
            if raw_line is None:
                yield _too_long(source, key, line_number, cap)
                continue
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            try:
                fields = next(csv.reader([text if text is not None else raw_line.decode("utf-8", "surrogateescape")],
                                         delimiter=delimiter, quoting=quoting, strict=True))
            except csv.Error as error:
                yield reject(_base_record(source, key), "bad_row", f"line {line_number}: {error} (a quote that is "
                             "not closed on its line? TSV files from the web are read with quoting: none)")
                continue
            if len(fields) != len(names):
                yield reject(_base_record(source, key), "bad_row",
                             f"line {line_number}: expected {len(names)} columns, got {len(fields)}")
                continue
            row = {name: fields[index] for name, index in where.items()}
            if text is None and any(_has_surrogate(value) for value in row.values()):
                yield reject(_base_record(source, key), "invalid_utf8", f"line {line_number}: not valid UTF-8")
                continue
            yield _record_from_row(source, source_file, key, row, f"line {line_number}")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
