"""From a parsed table row to a record or a reject: what every table reader shares.

No value a stranger can put in a row raises: a problem with one row is a `RowProblem` (a
reason and a detail), and `record_from_row` turns anything else into a `bad_row` reject.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Optional

from ..records import RowProblem, new_record, reject, row_id
from ..sources import SourceFile, resolve_url
from mmae.schemas.config import SourceConfig
from mmae.schemas.shard import reject_detail


def _text(value: Any, column: str, reason: str) -> Optional[str]:
    """A text cell: str, or bytes that must be UTF-8 (binary columns). Anything else is `reason`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError is handled by the caller
    raise RowProblem(reason, f"{column!r} is {type(value).__name__}, not text")


def label_value(value: Any, column: str) -> Optional[str]:
    """Labels may be class numbers too; objects and lists are not labels."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _text(value, column, "bad_label")


def record_from_row(
    source: SourceConfig, source_file: SourceFile, key: str, row: dict[str, Any], where: str = ""
) -> dict[str, Any]:
    """A parsed row as a record, or a reject: no value a stranger can put in a row raises."""
    record = new_record(source.name, source.kind, key)
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
        return reject(record, "bad_row", f"{where + ': ' if where else ''}{error_text(error)}")


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
        record["label"] = label_value(row.get(source.label_column), source.label_column)
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


def error_text(error: BaseException) -> str:
    """An exception as a deterministic one-line detail (no object addresses)."""
    text = reject_detail(str(error)) or type(error).__name__
    return f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text


def too_long(source: SourceConfig, key: str, line_number: int, cap: int) -> dict[str, Any]:
    return reject(new_record(source.name, source.kind, key), "row_too_long",
                  f"line {line_number} is longer than {cap:,} bytes (data.max_row_bytes); it was not read")
