"""Which streams a run reads, from its datasets' manifests: `build_streams` returns a `DataPlan`.

Each kind (or, with `source_weights`, each source inside a kind) of each dataset in train.data
is one `streams.Stream` with its share of every batch. Only footers are read, once, in the main
process (and the id/source columns where a hold-out split or source weights need them). The
plan's fingerprint (per-shard content keys) is what a checkpoint keeps, so a resume on other
data is refused in words.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from mmae.schemas.config import DatasetEntry, TrainConfig
from mmae.schemas.manifest import Manifest, ShardEntry, TokenizerEntry, read_manifest
from .batch import KINDS
from .streams import COLUMNS, DataError, Stream, check_columns, held_out

log = logging.getLogger("mmae.data")

_OTHER_SIDE = object()  # a row on the other side of the hold-out split


class TokenizerMismatch(DataError):
    """Datasets (or a checkpoint and a dataset) that do not share one tokenizer."""


@dataclass(frozen=True)
class DataPlan:
    """What `build_streams` found: the streams, the data's fingerprint (what a checkpoint keeps),
    the shards that could not be opened, and each shard's content key (to say what changed)."""

    streams: list[Stream]
    fingerprint: str
    skipped: list[str]
    shards: list[tuple[str, str, str]]  # (dataset path, shard path, content key)


def shard_key(entry: ShardEntry) -> str:
    """What identifies a shard's rows: the hash of what the trainer reads (ids, captions, image
    hashes, labels) where the build recorded it, else the file's bytes (older builds). A rebuild
    from another mirror or port keeps the first and changes the second (the url column)."""
    return str(getattr(entry, "content_sha256", None) or entry.sha256)


def tokenizer_of(paths: list[str], manifests: Optional[list[Manifest]] = None) -> Optional[TokenizerEntry]:
    """The one tokenizer the datasets share (datasets without one, image-only builds, agree with any);
    TokenizerMismatch naming two that differ and the fix."""
    manifests = manifests if manifests is not None else [read_manifest(path) for path in paths]
    found: Optional[tuple[str, TokenizerEntry]] = None
    for path, manifest in zip(paths, manifests):
        if manifest.tokenizer is None:
            continue
        if found is None:
            found = (path, manifest.tokenizer)
        elif manifest.tokenizer.sha256 != found[1].sha256:
            raise TokenizerMismatch(
                f"{found[0]} and {path} were built with different tokenizers ({found[1].sha256[:12]} vs "
                f"{manifest.tokenizer.sha256[:12]}): their token ids mean different words. Rebuild {path} with "
                f"--set data.tokenizer.model={found[0]} (a dataset folder or its tokenizer.model) so both share one")
    return found[1] if found else None


def build_streams(config: TrainConfig, split: str = "train") -> DataPlan:
    """Read the manifests and the footer of every shard a positive share needs.

    `split`: "train" reads train.data less its held-out rows (`train.validation.holdout`);
    "validation" reads those held-out rows, or `train.validation.data` when that is set.
    Several datasets in train.data: each kind's share is split between them by weight x rows,
    and inside one dataset between its sources by `source_weights` (by size when unset); their
    rows' ids are prefixed with the dataset's name, so ids stay unique.
    """
    validation = config.validation
    if split == "validation" and validation.data:
        datasets = [DatasetEntry(path=validation.data, name=None)]
        holdout = 0.0
    else:
        datasets = config.datasets
        holdout = validation.holdout
    several = len(datasets) > 1
    side = split if holdout > 0 else None
    manifests = [read_manifest(entry.path) for entry in datasets]
    tokenizer = tokenizer_of([entry.path for entry in datasets], manifests)
    vocab_size = tokenizer.vocab_size if tokenizer else 0
    known: dict[str, str] = {}
    for manifest in manifests:
        known.update(manifest.source_kinds())
    unknown = sorted(set(config.source_weights) - set(known))
    if unknown:
        where = " or ".join(entry.path for entry in datasets)
        raise DataError(f"train.source_weights names {', '.join(unknown)}, not a source of {where} (its sources: "
                        f"{', '.join(sorted(known)) or 'none recorded'})")
    shares = config.mix.shares()
    streams: list[Stream] = []
    skipped: list[str] = []
    shard_keys: list[tuple[str, str, str]] = []
    fingerprint = hashlib.sha256()
    for kind in KINDS:
        if shares[kind] <= 0:
            continue  # never read, not even opened
        found = []  # per dataset: (entry, {source: (urls, groups, rows)})
        for entry, manifest in zip(datasets, manifests):
            if several:
                fingerprint.update(f"dataset:{entry.name}:{entry.weight!r}".encode())
            prefix = f"{entry.name}:" if several else ""
            split_by_source = any(name in config.source_weights for name, of in manifest.source_kinds().items()
                                  if of == kind)
            per_source = _row_groups(config, entry.path, manifest, kind, split_by_source, side, holdout, prefix,
                                     fingerprint, skipped, shard_keys)
            if per_source:
                found.append((entry, prefix, per_source))
        sizes = [entry.weight * sum(sum(rows) for _, _, rows in per_source.values())
                 for entry, _, per_source in found]
        for (entry, prefix, per_source), size in zip(found, sizes):
            if size <= 0:
                continue
            dataset_share = shares[kind] * size / sum(sizes)
            weights = {name: (config.source_weights.get(name, 1.0) if name is not None else 1.0) for name in per_source}
            weight_sum = sum(weights.values())
            for name in sorted(per_source, key=lambda value: value or ""):
                if weights[name] <= 0:
                    continue
                urls, groups, rows = per_source[name]
                streams.append(Stream(kind, name, tuple(urls), tuple(groups), tuple(rows),
                                      dataset_share * weights[name] / weight_sum, holdout, side, vocab_size,
                                      dataset=entry.name if several else None, id_prefix=prefix))
        if not any(stream.kind == kind for stream in streams):
            which = f" on the {side} side of train.validation.holdout" if side else ""
            where = " or ".join(entry.path for entry in datasets)
            raise DataError(f"{where}: train.mix.{kind} is {shares[kind]:.3f} but there are no {kind} rows{which} "
                            "to read")
    if skipped:
        log.warning("%d shard(s) skipped (train.data_errors: skip): %s", len(skipped), ", ".join(skipped))
    return DataPlan(streams, fingerprint.hexdigest()[:16], skipped, shard_keys)


def _row_groups(config: TrainConfig, data: str, manifest: Manifest, kind: str, split_by_source: bool,
                side: Optional[str], holdout: float, prefix: str, fingerprint, skipped: list[str],
                shard_keys: list[tuple[str, str, str]]) -> dict[Optional[str], tuple[list, list, list]]:
    """One dataset's row groups of `kind`, per source (or all under None), with their row counts."""
    root = data.rstrip("/")
    per_source: dict[Optional[str], tuple[list, list, list]] = {}
    for entry in manifest.entries(kind):
        if not entry.rows:
            continue
        url = f"{root}/{entry.path}"
        key = shard_key(entry)
        fingerprint.update(key.encode())
        shard_keys.append((data, entry.path, key))
        try:
            with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
                metadata = parquet.metadata
                check_columns(parquet.schema_arrow, COLUMNS[kind])
                sources = None
                if split_by_source or side:
                    table = parquet.read(columns=["id", "source"])
                    names = table.column("source").to_pylist() if split_by_source else [None] * table.num_rows
                    if side:  # rows on the other side of the split count for nothing here
                        wanted = side == "validation"
                        names = [name if held_out(prefix + sample, holdout) == wanted else _OTHER_SIDE
                                 for name, sample in zip(names, table.column("id").to_pylist())]
                    sources = names
        except (OSError, pa.ArrowException, ValueError) as error:
            if config.data_errors == "skip":
                skipped.append(url)
                # The plan then differs from one with this shard: a checkpoint made with it
                # cannot be resumed without it (the fingerprint says so).
                fingerprint.update(b"skipped:" + url.encode())
                log.warning("skipping unreadable shard %s: its %d rows are not in this run's plan (%s)",
                            url, entry.rows, error)
                continue
            raise DataError(f"{url}: cannot open shard ({type(error).__name__}: {error})") from None
        start = 0
        for group in range(metadata.num_row_groups):
            size = metadata.row_group(group).num_rows
            if sources is None:
                counts = {None: size}
            else:
                counts = {}
                for name in sources[start:start + size]:
                    counts[name] = counts.get(name, 0) + 1
            start += size
            for name, count in counts.items():
                if name is _OTHER_SIDE:
                    continue
                urls, groups, rows = per_source.setdefault(name, ([], [], []))
                urls.append(url)
                groups.append(group)
                rows.append(count)
    return per_source
