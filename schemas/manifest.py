"""`manifest.json`: what a build produced. Written last, so its presence marks a complete build."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str  # relative to the dataset root, e.g. paired/part-00000-of-00002.parquet
    kind: str
    rows: int
    bytes: int
    sha256: str


class TokenizerEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str
    sha256: str
    vocab_size: int
    special_ids: dict[str, Optional[int]]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: str
    rows: dict[str, int]  # per kind
    shards: list[ShardEntry]
    rejects: list[ShardEntry]
    rejected: int
    tokenizer: Optional[TokenizerEntry]
    config: dict[str, Any]  # the resolved `data:` section
