"""`mmae validate DATASET`: check every shard against schema v1 and the manifest.

    mmae validate build/demo/shards            # exit 0: all good; exit 1: a list of problems

Checks: the manifest parses and has schema version 1; every listed file exists, has the listed
size and sha256, is a readable Parquet file with the v1 columns and types, carries
`mmae.schema_version`, and has the listed row count; no unlisted shard files sit beside them;
per-kind totals match; the tokenizer file matches its hash and vocabulary size; every token id is
in [0, vocab size); every image decodes at its recorded width/height; `kind` matches the folder.
Shards are read one row group at a time, so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from .dataset import Dataset
from mmae.schemas.manifest import Manifest, ManifestError, load_manifest_json
from mmae.schemas.shard import KINDS, OPTIONAL_COLUMNS, REJECT_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY, SHARD_SCHEMA
from PIL import Image
from pydantic import ValidationError

Image.MAX_IMAGE_PIXELS = None  # sizes are checked against the recorded ones instead


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    rows: int = 0  # data rows (the shards the trainer reads)
    rejects: int = 0  # rows of the rejects files
    images: int = 0

    def add(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_schema(where: str, schema: pa.Schema, expected: pa.Schema, report: Report) -> bool:
    ok = True
    for expected_field in expected:
        if expected_field.name not in schema.names:
            if expected_field.name in OPTIONAL_COLUMNS:
                continue
            report.add(where, f"missing column {expected_field.name!r}")
            ok = False
        elif not schema.field(expected_field.name).type.equals(expected_field.type):
            report.add(where, f"column {expected_field.name!r} is {schema.field(expected_field.name).type}, "
                              f"expected {expected_field.type}")
            ok = False
    version = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if version != SCHEMA_VERSION.encode():
        report.add(where, f"Parquet metadata {SCHEMA_VERSION_KEY.decode()} is {version!r}, expected {SCHEMA_VERSION!r}")
        ok = False
    return ok


def _check_rows(where: str, kind: str, table: pa.Table, first_row: int, vocab_size: Optional[int],
                decode_images: bool, report: Report) -> None:
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    for offset in range(table.num_rows):
        row_where = f"{where} row {first_row + offset}"
        if columns["kind"][offset] != kind:
            report.add(row_where, f"kind {columns['kind'][offset]!r} in the {kind}/ folder")
        tokens = columns.get("tokens", [None] * table.num_rows)[offset]
        if tokens is not None and vocab_size is not None:
            bad = [token for token in tokens if token < 0 or token >= vocab_size]
            if bad:
                report.add(row_where, f"token id {bad[0]} outside [0, {vocab_size})")
        if kind in ("paired", "image"):
            data = columns["image"][offset]
            if not data:
                report.add(row_where, "no image bytes")
                continue
            if not decode_images:
                continue
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
                    size = image.size
            except Exception as error:  # noqa: BLE001 - any decoder failure is the finding
                report.add(row_where, f"image does not decode ({type(error).__name__}: {error})")
                continue
            recorded = (columns["width"][offset], columns["height"][offset])
            if size != recorded:
                report.add(row_where, f"image decodes at {size[0]}x{size[1]}, recorded {recorded[0]}x{recorded[1]}")
            if hashlib.sha256(data).hexdigest() != columns["image_sha256"][offset]:
                report.add(row_where, "image_sha256 does not match the image bytes")
            report.images += 1


def _check_file(dataset: Dataset, entry: dict[str, Any], vocab_size: Optional[int], decode_images: bool,
                report: Report) -> None:
    fs, root = fsspec.core.url_to_fs(dataset.root)
    path = posixpath.join(root, entry["path"])
    where = entry["path"]
    if not fs.exists(path):
        report.add(where, "listed in the manifest but missing on disk")
        return
    if not fs.isfile(path):
        report.add(where, "not a regular file (a FIFO, device or folder); not read")
        return
    size = fs.size(path)
    if size != entry["bytes"]:
        report.add(where, f"{size} bytes on disk, manifest says {entry['bytes']}")
    if _sha256(fs, path) != entry["sha256"]:
        report.add(where, "sha256 differs from the manifest")
    is_rejects = entry["kind"] == "rejects"
    try:
        with fs.open(path, "rb") as handle, pq.ParquetFile(handle) as parquet:
            if not _check_schema(where, parquet.schema_arrow, REJECT_SCHEMA if is_rejects else SHARD_SCHEMA, report):
                return
            if parquet.metadata.num_rows != entry["rows"]:
                report.add(where, f"{parquet.metadata.num_rows} rows, manifest says {entry['rows']}")
            first_row = 0
            for group in range(parquet.num_row_groups):
                # Every column of every row group is read (and decompressed): a damaged column
                # chunk that training would meet is found here, not at step 40,000.
                try:
                    table = parquet.read_row_group(group)
                except (pa.ArrowException, OSError) as error:
                    report.add(where, f"row group {group} cannot be read ({type(error).__name__}: {error})")
                    first_row += parquet.metadata.row_group(group).num_rows
                    continue
                if not is_rejects:
                    _check_rows(where, entry["kind"], table, first_row, vocab_size, decode_images, report)
                first_row += table.num_rows
            if is_rejects:
                report.rejects += first_row
            else:
                report.rows += first_row
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as error:
        report.add(where, f"not a readable Parquet file ({type(error).__name__}: {error})")
        return
    report.shards += 1


def _merging(fs, base: str) -> set[str]:
    """Shards an interrupted `mmae build --append` has moved in but not yet listed (rerunning it
    lists them): the dataset is still the one its manifest describes."""
    journal = posixpath.join(base, ".append", "merge.json")
    try:
        return {target for _, target in json.loads(fs.cat_file(journal))["renames"]} if fs.exists(journal) else set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def validate(root: str, decode_images: bool = True) -> Report:
    report = Report()
    try:
        raw = load_manifest_json(root)
    except ManifestError as error:
        report.add(root, str(error))
        return report
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as error:  # every field problem, not just the first
        for problem in error.errors():
            report.add("manifest.json", f"{'.'.join(str(p) for p in problem['loc'])}: {problem['msg']}")
        return report
    dataset = Dataset(root, manifest)
    if manifest.schema_version != SCHEMA_VERSION:
        report.add("manifest.json", f"schema_version {manifest.schema_version!r}, this mmae reads {SCHEMA_VERSION!r}")
        return report

    fs, base = fsspec.core.url_to_fs(root)
    vocab_size = None
    if manifest.tokenizer:
        path = posixpath.join(base, manifest.tokenizer.path)
        if not fs.exists(path):
            report.add(manifest.tokenizer.path, "tokenizer listed in the manifest but missing on disk")
        elif _sha256(fs, path) != manifest.tokenizer.sha256:
            report.add(manifest.tokenizer.path, "sha256 differs from the manifest")
        else:
            import sentencepiece as spm

            with fs.open(path, "rb") as handle:
                actual = spm.SentencePieceProcessor(model_proto=handle.read()).get_piece_size()
            if actual != manifest.tokenizer.vocab_size:
                report.add(manifest.tokenizer.path, f"vocab size {actual}, manifest says {manifest.tokenizer.vocab_size}")
        vocab_size = manifest.tokenizer.vocab_size

    entries = [entry.model_dump() for entry in manifest.shards + manifest.rejects]
    for entry in entries:
        if entry["kind"] not in (*KINDS, "rejects"):
            report.add(entry["path"], f"unknown kind {entry['kind']!r}")
            continue
        _check_file(dataset, entry, vocab_size, decode_images, report)

    for kind in KINDS:
        listed = sum(entry.rows for entry in manifest.shards if entry.kind == kind)
        if manifest.rows.get(kind, 0) != listed:
            report.add("manifest.json", f"rows.{kind} is {manifest.rows.get(kind, 0)}, its {kind} shards hold {listed}")
    listed_paths = {entry["path"] for entry in entries} | _merging(fs, base)
    for folder in (*KINDS, "rejects"):
        folder_path = posixpath.join(base, folder)
        if not fs.exists(folder_path):
            continue
        for path in sorted(fs.find(folder_path)):
            relative = posixpath.relpath(path, base)
            if relative.endswith(".parquet") and relative not in listed_paths:
                report.add(relative, "shard file not listed in the manifest (a stale or foreign file?)")
    return report
