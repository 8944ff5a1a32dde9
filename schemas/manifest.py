"""`manifest.json`: what a build produced. Written last, so its presence marks a complete build.

The one reader of it: `read_manifest(root)` (a folder or an fsspec URL) returns a typed
`Manifest`; the loader, `mmae stats`, `mmae validate` and `mmae eval` all go through it.

    manifest = read_manifest("build/demo/shards")
    manifest.entries("paired")        # ShardEntry of every paired shard
    manifest.source_kinds()           # {"captions": "paired", "photos": "image", ...}
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """The dataset cannot be opened: no manifest, not JSON, or not an mmae manifest."""


def inside_path(value: str) -> str:
    """A path a manifest names: relative, inside the dataset folder (no `..`, no absolute path,
    no URL): a manifest from a stranger must not make a reader open /etc/passwd."""
    if (not value or value.startswith(("/", "\\")) or "://" in value or ":" in value.split("/")[0]
            or "\\" in value or any(part in ("..", "") for part in value.split("/"))
            or any(ord(ch) < 32 for ch in value)):
        raise ValueError(f"{value[:200]!r} is not a path inside the dataset folder")
    return value


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str  # relative to the dataset root, e.g. paired/part-00000-of-00002.parquet
    kind: str
    rows: int
    bytes: int
    sha256: str

    _inside = field_validator("path")(classmethod(lambda cls, value: inside_path(value)))


class TokenizerEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str
    sha256: str
    vocab_size: int = Field(ge=1, le=10_000_000)
    special_ids: dict[str, Optional[int]]

    _inside = field_validator("path")(classmethod(lambda cls, value: inside_path(value)))


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: str
    rows: dict[str, int]  # per kind
    shards: list[ShardEntry]
    rejects: list[ShardEntry] = Field(default_factory=list)
    rejected: int = 0
    tokenizer: Optional[TokenizerEntry] = None
    sources: dict[str, str] = Field(default_factory=dict)  # source name -> kind (builds since 0.2)
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved `data:` section

    def entries(self, *kinds: str) -> list[ShardEntry]:
        """The data shards of the given kinds (all kinds when none is given), in manifest order."""
        return [entry for entry in self.shards if not kinds or entry.kind in kinds]

    def source_kinds(self) -> dict[str, str]:
        """Which kind each source produced: the build's own map, or (older builds) its config."""
        if self.sources:
            return dict(self.sources)
        return {source["name"]: source["kind"] for source in self.config.get("sources", [])
                if isinstance(source, dict) and "name" in source and "kind" in source}

    @property
    def max_tokens(self) -> Optional[int]:
        return self.config.get("text", {}).get("max_tokens")


def manifest_url(root: str) -> str:
    return posixpath.join(root.rstrip("/"), MANIFEST)


def load_manifest_json(root: str) -> dict[str, Any]:
    """The manifest as JSON, untyped (for `mmae validate`, which reports every field problem)."""
    import fsspec

    url = manifest_url(root)
    _refuse_special(url)
    try:
        with fsspec.open(url, "r", encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise ManifestError(f"{root}: no manifest.json (not an mmae build, or the build did not finish; "
                            "run `mmae build` first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{url}: not valid JSON ({error})") from None
    except RecursionError:
        raise ManifestError(f"{url}: not an mmae manifest (JSON nested deeper than any manifest)") from None
    except OSError as error:
        raise ManifestError(f"{url}: cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ManifestError(f"{url}: not an mmae manifest (no 'shards')")
    return manifest


def _refuse_special(url: str) -> None:
    """A local FIFO, device or folder where a file belongs: opening a FIFO waits forever."""
    import os
    import stat

    if "://" in url and not url.startswith("file://"):
        return
    try:
        mode = os.stat(url.removeprefix("file://")).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise ManifestError(f"{url}: not a regular file (a FIFO, device or folder); nothing was read from it")


def read_manifest(root: str) -> Manifest:
    """The typed manifest; refused (ManifestError) unless it is schema version this mmae reads
    and every path it names lies inside the dataset folder."""
    from .shard import SCHEMA_VERSION

    try:
        manifest = Manifest.model_validate(load_manifest_json(root))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
                             for problem in error.errors()[:3])
        raise ManifestError(f"{manifest_url(root)}: not a valid mmae manifest ({problems})") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise ManifestError(f"{manifest_url(root)}: schema_version {manifest.schema_version!r}; this mmae reads "
                            f"version {SCHEMA_VERSION!r} (rebuild the dataset, or use the mmae that built it)")
    for entry in [*manifest.shards, *manifest.rejects, *([manifest.tokenizer] if manifest.tokenizer else [])]:
        _refuse_special(posixpath.join(root.rstrip("/"), entry.path))
    return manifest
