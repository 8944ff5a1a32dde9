"""WebDataset tars (what img2dataset and webdataset write), read as samples without extracting.

A sample is the run of consecutive members sharing a key: the member path up to the first dot
of its file name (`dir/000123.jpg` and `dir/000123.txt` are sample `dir/000123`). The tar is
streamed once, never held whole: small members (`txt`, `json`, `cls`) are read, and for the
image member only its place in the tar (offset and size) is kept, so the download stage reads
the image bytes itself (`inline.InlineImages`) and no image crosses a shuffle.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

import fsspec

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the first present is the sample's image
TEXT_EXTENSIONS = ("txt", "json", "cls")
MAX_TEXT_MEMBER = 1 << 20  # bytes; a larger txt/json member is a bad sample, not read


@dataclass
class Sample:
    key: str
    texts: dict[str, bytes] = field(default_factory=dict)  # extension -> content
    images: dict[str, tuple[int, int]] = field(default_factory=dict)  # extension -> (offset, size)
    problems: list[str] = field(default_factory=list)
    not_read: list[str] = field(default_factory=list)  # members that are links or devices, named

    @property
    def image(self) -> Optional[tuple[str, int, int]]:
        """(extension, offset, size) of the sample's image, or None."""
        for extension in IMAGE_EXTENSIONS:
            if extension in self.images:
                return (extension, *self.images[extension])
        return None


def _split(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def samples(path: str) -> Iterator[Sample]:
    """The samples of one tar, in order. A damaged tar raises `tarfile.TarError` (or OSError).
    Links and devices are never read, but they are part of their sample (which, if they were all
    it had, becomes a reject naming them). A key that comes back after other samples is a
    sample of its own, keyed `key@2`, `key@3`...: two samples never share a row id."""
    with fsspec.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        current: Optional[Sample] = None
        current_key = None  # its key as the members spell it (without @N)
        seen: dict[str, int] = {}
        for member in tar:
            tar.members.clear()  # the index of members read so far would grow with the tar
            if member.isdir():
                continue
            key, extension = _split(member.name)
            if not extension:
                continue  # no extension: not part of any sample
            if current is None or key != current_key:
                if current is not None:
                    yield current
                current_key = key
                seen[key] = seen.get(key, 0) + 1
                current = Sample(key if seen[key] == 1 else f"{key}@{seen[key]}")
            if not member.isfile():
                current.not_read.append(f"{member.name} ({'link' if member.issym() or member.islnk() else 'not a file'})")
            elif extension in TEXT_EXTENSIONS:
                if member.size > MAX_TEXT_MEMBER:
                    current.problems.append(f"{member.name}: {member.size} bytes, more than {MAX_TEXT_MEMBER}")
                else:
                    extracted = tar.extractfile(member)
                    current.texts[extension] = extracted.read() if extracted is not None else b""
            elif extension in IMAGE_EXTENSIONS:
                current.images.setdefault(extension, (member.offset_data, member.size))
        if current is not None:
            yield current


def count_samples(path: str) -> int:
    return sum(1 for _ in samples(path))
