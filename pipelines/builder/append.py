"""`mmae build --append`: a finished build grows by new sources, new files of a source, and rows
added at the end of a source's line files (.jsonl, .txt, .csv, .tsv), and nothing it holds is
fetched or written again.

Every build records its input files in the manifest (`inputs`: per source, each file's size,
sha256 and last row number). `--append` compares the config's sources with them: a file of the
same size and hash is done; a longer file whose first bytes are the recorded file is read from
the row after the recorded last one; a new file or source is read whole; anything else (a file
that changed, another setting that decides what rows are) is refused by name.

The additions are built like any build, into `OUT/.append/` (so the same command resumes a
killed append, with its own staging), with three differences: the tokenizer is the dataset's
own; the exact and near dedup groups also hold the keys of every row the dataset already has
(`ExistingKeys`: its URLs, texts, stored images and their perceptual hashes, read back from the
shards and rejects), so a new row that repeats an old one is rejected naming the old id; and
rows may all be rejected. Then `merge` moves the new shards next to the old ones, under names
that sort after them (`part-a001-00000-of-00002.parquet`), and replaces the manifest and report
atomically; a journal (`OUT/.append/merge.json`) lets a rerun finish an interrupted merge. Until
the new manifest is in place, OUT is the old dataset, and old shards are never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq
from . import neardup, staging
from .dedup import HashPacker, image_key, text_key, url_key
from .output import BuildError, _changed_keys, staging_settings
from .records import ChunkKey, Packed
from .sources import SourceError, expand_source
from ..shards import join, write_json
from mmae.schemas.config import DataConfig

log = logging.getLogger("mmae.build")

INCREMENT = ".append"
JOURNAL = "merge.json"
LINE_FORMATS = ("jsonl", "txt", "csv", "tsv")
BY_LINE = ("jsonl", "txt")  # rows numbered by line; the others by row
EXISTING_SOURCE = -1  # ChunkKey.source of the dataset's own rows: before every new chunk


# --- what a build read ---------------------------------------------------------------------------

def _scan(path: str, fmt: str, rows: int) -> dict[str, Any]:
    """Size, sha256 and last row number of one input file (rows numbered as the reader numbers
    them: by line for .jsonl/.txt, by row otherwise)."""
    digest, size, lines, last = hashlib.sha256(), 0, 0, b"\n"
    compressed = fsspec.utils.infer_compression(path) is not None
    with fsspec.open(path, "rb") as handle:  # one read: the hash, and the lines of a plain file
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
            last = block[-1:]
            if fmt in BY_LINE and not compressed:
                lines += block.count(b"\n")
    if fmt in BY_LINE and not compressed:
        lines += size > 0 and last != b"\n"
    elif fmt in BY_LINE:  # a compressed file counts its lines decompressed
        with fsspec.open(path, "rb", compression="infer") as handle:
            tail = b"\n"
            while block := handle.read(1 << 20):
                lines += block.count(b"\n")
                tail = block[-1:]
            lines += tail != b"\n"
    return {"bytes": size, "sha256": digest.hexdigest(), "last_row": lines if fmt in BY_LINE else rows,
            "ends_with_newline": last == b"\n"}


def describe_inputs(config: DataConfig, plan) -> dict[str, Any]:
    """`inputs` of the manifest: per source, {file key prefix: size, sha256, last row}; an image
    folder counts its files."""
    described: dict[str, Any] = {}
    for planned in plan.files:
        source = config.sources[planned.source_index]
        entry = described.setdefault(source.name, {"files": {}, "image_files": 0})
        if planned.file.format == "image":
            entry["image_files"] += 1
        else:
            entry["files"][planned.file.relative] = {"format": planned.file.format, "rows": planned.rows,
                                                     **_scan(planned.file.path, planned.file.format, planned.rows)}
    return described


def _prefix_sha256(path: str, size: int) -> str:
    digest, left = hashlib.sha256(), size
    with fsspec.open(path, "rb") as handle:
        while left > 0 and (block := handle.read(min(left, 1 << 20))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _byte_at(path: str, offset: int) -> bytes:
    with fsspec.open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(1)


# --- what an append reads --------------------------------------------------------------------

@dataclass
class AppendPlan:
    """Which files of which sources to read, from which row (0: all of it)."""

    old: dict[str, Any]  # the dataset's manifest
    start_after: dict[int, dict[str, int]] = field(default_factory=dict)  # source index -> {relative: last old row}
    existing_rows: int = 0

    def wants(self, source_index: int, relative: str) -> bool:
        return relative in self.start_after.get(source_index, {})

    def skip(self, source_index: int, relative: str) -> int:
        return self.start_after.get(source_index, {}).get(relative, 0)

    @property
    def generation(self) -> int:
        return len(self.old.get("appends", [])) + 1


def plan_append(config: DataConfig) -> AppendPlan:
    """Compare the config with the finished build in data.output; refuse what would change old rows."""
    fs, root = fsspec.core.url_to_fs(config.output)
    try:
        old = json.loads(fs.cat_file(join(root, "manifest.json")))
    except (OSError, ValueError):
        raise BuildError(f"{config.output}: no finished build to append to (build it first, without --append)") from None
    if "inputs" not in old:
        raise BuildError(f"{config.output} was built before builds recorded their input files, so what is new "
                         "cannot be told apart; rebuild it once with --overwrite, then --append works")
    before = DataConfig.model_validate({**old["config"], "output": config.output})
    old_settings, new_settings = staging_settings(before), staging_settings(config)
    old_sources = {source["name"]: source for source in old_settings.pop("sources")}
    new_sources = {source["name"]: source for source in new_settings.pop("sources")}
    for settings in (old_settings, new_settings):
        settings.pop("chunk_rows", None)  # how rows are grouped for resume, not what they become
    changed = _changed_keys(old_settings, new_settings)
    for name, source in old_sources.items():
        if name not in new_sources:
            continue  # a source left out of the config adds nothing; its rows stay
        changed += [f"sources.{name}.{key}" for key in _changed_keys(source, new_sources[name])]
    if config.tokenizer.model and config.tokenizer.model.rstrip("/") != config.output.rstrip("/"):
        changed.append("tokenizer.model")
    if changed:
        raise BuildError(f"--append: {', '.join('data.' + key for key in changed)} changed since {config.output} "
                         "was built; those decide what its rows are, so the new rows would not match the old "
                         "ones. Append with the settings it was built with, or rebuild with --overwrite")
    plan = AppendPlan(old=old, existing_rows=sum(old["rows"].values()) + old.get("rejected", 0))
    for index, source in enumerate(config.sources):
        recorded = old["inputs"].get(source.name, {"files": {}, "image_files": 0})
        try:
            files = expand_source(source)
        except SourceError as error:
            raise BuildError(str(error)) from None
        wanted: dict[str, int] = {}
        images = [found for found in files if found.format == "image"]
        if images and recorded["image_files"] and len(images) != recorded["image_files"]:
            raise BuildError(f"--append: the image folder of source {source.name!r} holds {len(images)} images, "
                             f"{recorded['image_files']} when it was built; new images sort among the old ones, so "
                             "add them as a new source (another folder) instead")
        if images and not recorded["image_files"]:
            wanted.update({found.relative: 0 for found in images})
        for found in files:
            if found.format == "image":
                continue
            before_file = recorded["files"].get(found.relative)
            if before_file is None:
                wanted[found.relative] = 0
                continue
            skip = _grown_from(source.name, found, before_file)
            if skip is not None:
                wanted[found.relative] = skip
        if wanted:
            plan.start_after[index] = wanted
    return plan


def _grown_from(source: str, found, before: dict[str, Any]) -> Optional[int]:
    """None: the file is as it was built; else the last old row (new rows follow it)."""
    fs, local = fsspec.core.url_to_fs(found.path)
    size = fs.size(local)
    if size == before["bytes"] and _prefix_sha256(found.path, size) == before["sha256"]:
        return None
    where = f"--append: source {source!r}: {found.path}"
    if size < before["bytes"] or _prefix_sha256(found.path, before["bytes"]) != before["sha256"]:
        raise BuildError(f"{where} changed since it was built (its first {before['bytes']:,} bytes are not the ones "
                         "built); rows may only be added at the end. Put new rows in a new file, or rebuild with "
                         "--overwrite")
    if found.format not in LINE_FORMATS or found.path.endswith((".gz", ".bz2", ".xz", ".zst")):
        raise BuildError(f"{where} grew, but rows can only be added at the end of uncompressed "
                         f"{', '.join('.' + name for name in LINE_FORMATS)} files; add a new file instead")
    if not before["ends_with_newline"] and _byte_at(found.path, before["bytes"]) != b"\n":
        raise BuildError(f"{where}: its last row was extended (it ended without a line break); add rows after a "
                         "line break, or rebuild with --overwrite")
    return before["last_row"]


# --- the dataset's own rows in the dedup groups ----------------------------------------------

class ExistingKeysFn(beam.DoFn):
    """One shard or rejects file of the dataset -> its rows' dedup keys: tagged `read` (URLs
    within a source, texts, near-duplicate text bands: what the reader's keys meet) and `image`
    (stored images, near-duplicate image bands: what the download stage's keys meet)."""

    def __init__(self, config: DataConfig, root: str, buckets: int) -> None:
        self.config, self.root, self.buckets = config, root, buckets

    def process(self, element: tuple[int, dict[str, Any]]) -> Iterator[Any]:
        number, entry = element
        quality = self.config.quality
        columns = ["id", "source", "url"] + ([] if entry["kind"] == "rejects" else
                                             ["caption", "image_sha256"] + (["image"] if entry["kind"] != "text" and
                                                                            quality.near_duplicate_images is not None else []))
        path = f"{self.root.rstrip('/')}/{entry['path']}"
        try:
            with fsspec.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=columns)
        except (OSError, ValueError) as error:  # pyarrow's errors are both
            raise BuildError(f"--append: {path} of the dataset cannot be read ({error}); check it with mmae validate "
                             "before appending") from None
        chunk = ChunkKey(EXISTING_SOURCE, number, 0)
        read = {what: HashPacker(self.buckets) for what in ("url", "text", neardup.NEAR)}
        stored = {what: HashPacker(self.buckets) for what in ("image", neardup.IMAGE_NEAR)}
        rows = table.to_pylist()
        hashes = self._image_hashes(rows)
        texts: list[int] = []  # rows whose near-duplicate text keys and image keys are made below, at once
        images: list[int] = []
        for index, row in enumerate(rows):
            kind = entry["kind"]
            if kind == "text":
                read["text"].add(text_key({"caption": row["caption"]}), index, row["id"])
            elif row.get("url"):
                read["url"].add(url_key({"source": row["source"], "url": row["url"]}), index, row["id"])
            if kind == "rejects":
                continue
            if quality.near_duplicate_texts and row.get("caption") is not None and (
                    kind == "text" or (kind == "paired" and quality.near_duplicate_captions)):
                texts.append(index)
            if kind != "text":
                stored["image"].add(image_key(kind, row["image_sha256"], row.get("caption")), index, row["id"])
                if hashes.get(index):
                    images.append(index)
        if texts:
            high, low, owner = neardup.text_band_keys([rows[index]["caption"] for index in texts], entry["kind"],
                                                      quality.near_duplicate_texts)
            read[neardup.NEAR].add_many(high, low, owner, texts, [rows[index]["id"] for index in texts])
        if images:
            high, low, owner = neardup.images_band_keys(
                [hashes[index] for index in images],
                [neardup.image_group(entry["kind"], rows[index].get("caption")) for index in images])
            stored[neardup.IMAGE_NEAR].add_many(high, low, owner, images, [rows[index]["id"] for index in images])
        for tag, packers in (("read", read), ("image", stored)):
            for what, packer in packers.items():
                if what in (neardup.NEAR, neardup.IMAGE_NEAR):  # many per row: staged, as in a build
                    slug = "existing-near-text" if what == neardup.NEAR else "existing-near-image"
                    places = packer.spill(staging.keys_url(self.config.output, "dataset", chunk, slug))
                else:
                    places = packer.items()
                for bucket, packed in places:
                    yield beam.pvalue.TaggedOutput(tag, (bucket, Packed(chunk, what, packed)))


    @staticmethod
    def _image_hashes(rows: list[dict[str, Any]]) -> dict[int, Optional[list[int]]]:
        """Perceptual hashes of the stored images (decoded again: shards keep only the first), one
        batch per file."""
        indices, thumbnails = [], []
        for index, row in enumerate(rows):
            if row.get("image") is not None:
                thumbnails.append(neardup.stored_thumbnail(row["image"]))
                indices.append(index)
        return dict(zip(indices, neardup.hashes_of_thumbnails(thumbnails)))


class ExistingKeys(beam.PTransform):
    """The dedup keys of every row the dataset holds (shards and rejects); outputs `read`, `image`."""

    def __init__(self, config: DataConfig, root: str, manifest: dict[str, Any], buckets: int) -> None:
        super().__init__()
        self.config, self.root, self.buckets = config, root, buckets
        self.entries = list(enumerate(manifest["shards"] + manifest.get("rejects", [])))

    def expand(self, pipeline):
        return (
            pipeline
            | "ListFiles" >> beam.Create(self.entries)
            | "Spread" >> beam.Reshuffle()
            | "Keys" >> beam.ParDo(ExistingKeysFn(self.config, self.root, self.buckets)).with_outputs("read", "image")
        )


# --- merging the additions into the dataset ----------------------------------------------------

def increment_config(config: DataConfig, plan: AppendPlan) -> DataConfig:
    """The additions' build: into OUT/.append, with the dataset's own tokenizer (new words are
    cut into the pieces it has; none is added, so token ids keep their meaning)."""
    if plan.old.get("tokenizer") is None:
        if any(source.kind != "image" for index, source in enumerate(config.sources) if index in plan.start_after):
            raise BuildError(f"--append: {config.output} holds no text, so it has no tokenizer to tokenize new "
                             "captions or texts with; build them as their own dataset")
        return config.model_copy(update={"output": join(config.output, INCREMENT)})
    return config.model_copy(update={
        "output": join(config.output, INCREMENT),
        "tokenizer": config.tokenizer.model_copy(update={"model": config.output}),
    })


def _renamed(relative: str, generation: int) -> str:
    folder, name = relative.split("/", 1)
    return f"{folder}/part-a{generation:03d}-{name.removeprefix('part-')}"


def _sum_report(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    sources = {name: dict(entry) for name, entry in old["sources"].items()}
    for name, entry in new["sources"].items():
        if name not in sources:
            sources[name] = dict(entry)
            continue
        merged = sources[name]
        for key in ("read", "written", "rejected"):
            merged[key] = merged[key] + entry[key]
        reasons = dict(merged["reasons"])
        for reason, count in entry["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
        merged["reasons"] = dict(sorted(reasons.items()))
    reasons: dict[str, int] = {}
    for entry in sources.values():
        for reason, count in entry["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    written = {kind: old["written"].get(kind, 0) + new["written"].get(kind, 0) for kind in old["written"]}
    problems = [f"{name}: read {entry['read']} != written {entry['written']} + rejected {entry['rejected']}"
                for name, entry in sources.items() if entry["read"] != entry["written"] + entry["rejected"]]
    return {**old, "read": old["read"] + new["read"], "written": written, "rejected": sum(reasons.values()),
            "reasons": dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))), "sources": sources,
            "balanced": not problems, "problems": problems}


def merge(config: DataConfig, plan: AppendPlan) -> dict[str, Any]:
    """Move the finished additions into the dataset and replace its manifest and report. Each
    step can be redone: a rerun after a crash at any point finishes the merge."""
    fs, root = fsspec.core.url_to_fs(config.output)
    increment = join(root, INCREMENT)
    journal_path = join(increment, JOURNAL)
    if fs.exists(journal_path):
        journal = json.loads(fs.cat_file(journal_path))
    else:
        new = json.loads(fs.cat_file(join(increment, "manifest.json")))
        new_report = json.loads(fs.cat_file(join(increment, "build_report.json")))
        generation = plan.generation
        entries = [{**entry, "path": _renamed(entry["path"], generation)} for entry in new["shards"] + new["rejects"]]
        renames = [[entry["path"], renamed["path"]] for entry, renamed in zip(new["shards"] + new["rejects"], entries)]
        old = plan.old
        manifest = {
            **old,
            "rows": {kind: old["rows"].get(kind, 0) + new["rows"].get(kind, 0) for kind in old["rows"]},
            "shards": old["shards"] + entries[:len(new["shards"])],
            "rejects": old.get("rejects", []) + entries[len(new["shards"]):],
            "rejected": old.get("rejected", 0) + new.get("rejected", 0),
            "sources": {**old.get("sources", {}), **new.get("sources", {})},
            "config": {**new["config"], "output": old["config"].get("output", config.output),
                       "tokenizer": old["config"]["tokenizer"]},
            "inputs": _merged_inputs(old["inputs"], new["inputs"]),
            "appends": old.get("appends", []) + [{
                "generation": generation, "rows": new["rows"], "rejected": new.get("rejected", 0),
                "read": new_report["read"], "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}],
        }
        old_report = json.loads(fs.cat_file(join(root, "build_report.json")))
        journal = {"generation": generation, "renames": renames, "manifest": manifest,
                   "report": {**_sum_report(old_report, new_report), "appended": new_report}}
        write_json(join(config.output, INCREMENT, JOURNAL), journal)
    for source, target in journal["renames"]:
        if fs.exists(join(increment, source)):
            fs.makedirs(join(root, target.split("/", 1)[0]), exist_ok=True)
            fs.mv(join(increment, source), join(root, target))
    current = json.loads(fs.cat_file(join(root, "manifest.json")))
    if len(current.get("appends", [])) < journal["generation"]:
        write_json(join(config.output, "manifest.json"), journal["manifest"])
    write_json(join(config.output, "build_report.json"), journal["report"])
    fs.rm(increment, recursive=True)
    return journal["report"]


def _merged_inputs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = {name: {"files": dict(entry["files"]), "image_files": entry["image_files"]} for name, entry in old.items()}
    for name, entry in new.items():
        target = merged.setdefault(name, {"files": {}, "image_files": 0})
        target["files"].update(entry["files"])  # a grown file is recorded as it is now
        target["image_files"] += entry["image_files"]
    return merged


def has_appends(config: DataConfig) -> bool:
    fs, root = fsspec.core.url_to_fs(config.output)
    try:
        return bool(json.loads(fs.cat_file(join(root, "manifest.json"))).get("appends"))
    except (OSError, ValueError):
        return False


def pending_merge(config: DataConfig) -> bool:
    fs, root = fsspec.core.url_to_fs(config.output)
    return fs.exists(join(root, INCREMENT, JOURNAL))


