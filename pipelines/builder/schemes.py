"""The one table of URL schemes a row's url may name, and how each is read.

`sources.resolve_url` judges a url with it (what a source allows) and `fetch.Fetcher` routes
with it (HTTP, or a file system through fsspec), so the two can never disagree.
"""

from __future__ import annotations

from typing import Literal, Optional
from urllib.parse import urlsplit

Family = Literal["http", "local", "object_store"]

SCHEMES: dict[str, Family] = {
    "http": "http", "https": "http",
    "file": "local", "local": "local",
    # Read through fsspec with this machine's credentials, only where a source allows it
    # (`allow_object_stores: true`); a missing file-system package is a bad_url reject naming it.
    **{scheme: "object_store" for scheme in (
        "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hdfs", "webhdfs", "oss", "r2", "memory")},
}


def scheme_of(url: str) -> str:
    """The lower-case scheme; "" for a path (a one-letter scheme is a Windows drive: a path)."""
    scheme = urlsplit(url).scheme.lower()
    return scheme if len(scheme) > 1 else ""


def family_of(scheme: str) -> Optional[Family]:
    return SCHEMES.get(scheme)


def names(family: Family) -> tuple[str, ...]:
    return tuple(scheme for scheme, of in SCHEMES.items() if of == family)
