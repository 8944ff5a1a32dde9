"""Reading a row's image from a path, a local file or an object store (what is not HTTP).

Local files: regular files only, so a FIFO or device is never waited on or read
(`localfiles.read_regular_file`). Object stores: fsspec with this machine's credentials; a
missing file-system package is a `bad_url` naming it. Both are capped at `max_bytes`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import fsspec
from .connections import FetchError
from .schemes import family_of, scheme_of
from ..localfiles import NotARegularFile, read_regular_file


class FileReader:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def read(self, url: str) -> bytes:
        scheme = scheme_of(url)
        if not scheme:
            return self._local(url)
        if family_of(scheme) == "local":
            return self._local(urlsplit(url).path)
        return self._object_store(url, scheme)

    def _local(self, path: str) -> bytes:
        try:
            data, size = read_regular_file(path, self.max_bytes)
        except FileNotFoundError:
            raise FetchError("not_found", "no such file") from None
        except (NotARegularFile, IsADirectoryError):
            raise FetchError("not_a_file", "not a regular file (FIFO, device or folder)") from None
        except PermissionError as error:
            raise FetchError("not_found", type(error).__name__) from None
        except (OSError, ValueError) as error:
            raise FetchError("bad_url", f"{type(error).__name__}: {error}") from None
        if size > self.max_bytes or len(data) > self.max_bytes:
            raise FetchError("too_large", f"{size} bytes > {self.max_bytes}")
        return data

    def _object_store(self, url: str, scheme: str) -> bytes:
        try:
            fs, path = fsspec.core.url_to_fs(scheme + url[len(scheme):])
        except (ImportError, OSError) as error:  # no package, or its native library (hdfs: libjvm) missing
            raise FetchError("bad_url", f"no file system for {scheme}:// here ({str(error).splitlines()[0][:200]})") from None
        except ValueError as error:
            raise FetchError("bad_url", str(error)) from None
        try:
            size = fs.size(path)
            if size is not None and size > self.max_bytes:
                raise FetchError("too_large", f"{size} bytes > {self.max_bytes}")
            with fs.open(path, "rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except FileNotFoundError as error:
            raise FetchError("not_found", str(error)) from None
        except FetchError:
            raise
        except OSError as error:
            raise FetchError("connection_error", f"{type(error).__name__}: {error}") from None
        if len(data) > self.max_bytes:
            raise FetchError("too_large", f"more than {self.max_bytes} bytes")
        return data
