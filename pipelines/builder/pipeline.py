"""`mmae build`: the Beam pipeline that turns input corpora into Parquet shards.

    mmae demo-data build/demo/raw            # a synthetic corpus to try it on
    mmae build --config pipeline.yaml        # embedded DirectRunner
    mmae build --config pipeline.yaml -- --direct_num_workers=2 --direct_running_mode=multi_processing
    mmae build --config pipeline.yaml -- --runner=FlinkRunner --flink_master=localhost:8081
    mmae build --config pipeline.yaml                    # again after a crash: resumes
    mmae build --config pipeline.yaml --retry-transient  # a finished build: retry timeouts/5xx/429

Read top-down, the pipeline is a few named composites (one module each):

    ReadChunks (read + clean text; each chunk's records go to OUT/staging/inputs)
        -> FindDuplicates (URLs within a source, texts)
        -> DownloadChunks (copies rejected unfetched; every row goes to OUT/staging/chunks)
        -> FindDuplicates (stored images) -> TrainTokenizer
        -> WriteShards (streams staging: kept rows per kind, and rejects, in input order)
        -> Finalize (tokenizer.model, build_report.json, manifest.json)

Only per-chunk summaries and packed 30-byte dedup entries cross a shuffle, never a record or
an image, so memory does not grow with the dataset on any runner.

Every input row ends either in a shard or in `rejects/` with a reason; the build fails if
`read = written + rejected` does not hold per source, or if it wrote no rows at all.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import time
from typing import Any, Optional

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions
from . import append as appending
from .append import ExistingKeys
from .dedup import KEYS, FindDuplicates
from .download import CAPTIONS, DownloadChunks
from .finalize import Finalize
from .output import (
    BuildError,
    Mode,
    check_apart_from_inputs,
    discard_previous,
    prepare_output,
    restore_previous,
)
from .plan import BuildPlan, make_plan
from .progress import ProgressMonitor
from .read import ReadChunks
from .replace import is_build_file
from .sources import SourceError, input_folders
from .staging import STAGING
from .tokenizer import Tokenizer, TrainTokenizer
from .write import REJECTS, WriteShards
from ..shards import join, write_json
from mmae.schemas.config import Config, DataConfig
from mmae.schemas.manifest import ManifestError, read_manifest

__all__ = ["BuildError", "build_pipeline", "run"]

log = logging.getLogger("mmae.build")


def build_pipeline(pipeline: beam.Pipeline, config: DataConfig, plan: BuildPlan, given_model: Optional[bytes],
                   retry_transient: bool = False, inputs: Optional[dict[str, Any]] = None,
                   existing: Optional[tuple[str, dict[str, Any]]] = None) -> None:
    """`existing`: (dataset folder, manifest) whose rows come first in every dedup group
    (`mmae build --append`)."""
    read = pipeline | "ReadChunks" >> ReadChunks(config, plan.units(), plan.chunk_rows, plan.buckets)
    read_keys, image_keys = read[KEYS], None
    if existing is not None:
        old = pipeline | "ExistingKeys" >> ExistingKeys(config, *existing, plan.buckets)
        read_keys = (read[KEYS], old.read) | "WithExistingRows" >> beam.Flatten()
        image_keys = old.image
    duplicates = read_keys | "DuplicateUrlsAndTexts" >> FindDuplicates()
    staged = read.chunks | "DownloadChunks" >> DownloadChunks(config, duplicates, plan.buckets, retry_transient)
    if image_keys is not None:
        image_keys = (staged[KEYS], image_keys) | "WithExistingImages" >> beam.Flatten()
    image_duplicates = ((image_keys if image_keys is not None else staged[KEYS])
                        | "DuplicateImages" >> FindDuplicates(config.quality.near_duplicate_images or 0))
    model = staged[CAPTIONS] | "Tokenizer" >> TrainTokenizer(config.tokenizer, given_model)
    written = staged.summaries | "WriteShards" >> WriteShards(config, image_duplicates, model)
    pipeline | "Finalize" >> Finalize(config, staged.summaries, written["shards"], written[REJECTS], model,
                                      inputs, allow_empty=existing is not None)


def _load_tokenizer(data: DataConfig) -> Optional[bytes]:
    """`data.tokenizer.model`: a SentencePiece .model, or a built dataset whose tokenizer this
    build reuses (so that the two can be trained on together: same model, same ids)."""
    given = data.tokenizer.model
    if not given:
        return None
    path = given
    fs, local = fsspec.core.url_to_fs(given)
    if fs.isdir(local):
        try:
            tokenizer = read_manifest(given).tokenizer
        except ManifestError as error:
            raise BuildError(f"data.tokenizer.model {given} is a folder but not a built dataset ({error})") from None
        if tokenizer is None:
            raise BuildError(f"data.tokenizer.model {given}: that dataset has no tokenizer (it holds no text)")
        path = f"{given.rstrip('/')}/{tokenizer.path}"
    try:
        with fsspec.open(path, "rb") as handle:
            model = handle.read()
        Tokenizer(model, 1)
    except (OSError, RuntimeError) as error:
        raise BuildError(f"data.tokenizer.model {path}: cannot load ({error})") from None
    return model


def _remove_stale_files(data: DataConfig, report_manifest: dict[str, Any]) -> None:
    """Shard files of an earlier attempt that this build did not write (other counts, temp files)."""
    listed = {entry["path"] for entry in report_manifest["shards"] + report_manifest["rejects"]}
    fs, root = fsspec.core.url_to_fs(data.output)
    for folder in ("paired", "image", "text", "rejects"):
        path = join(root, folder)
        if not fs.exists(path):
            continue
        for name in fs.ls(path, detail=False):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if is_build_file(f"{folder}/{base}") and f"{folder}/{base}" not in listed:
                fs.rm(name)


def _empty_build_message(report: dict[str, Any]) -> str:
    top = list(report["reasons"].items())[:5]
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in top) or "no rows read"
    message = f"the build wrote no rows: {report['read']:,} read, {report['rejected']:,} rejected ({reasons})"
    if "private_address" in report["reasons"]:
        message += (". Hint: the URLs resolve to private/loopback addresses, refused by default; allow a "
                    "trusted network with data.download.allowed_networks (e.g. [10.0.0.0/8]) or "
                    "data.download.allow_private_addresses: true, then rerun with --overwrite")
    elif "bad_url" in report["reasons"] or "not_found" in report["reasons"]:
        message += ". Hint: check url_column and base_url of the sources"
    return message


def run(config: Config, beam_args: list[str] | None = None, overwrite: bool = False,
        retry_transient: bool = False, append: bool = False) -> dict[str, Any]:
    """Plan, run (or resume) the pipeline, and return the build report (with timing).
    `append`: add what is new in the sources to the finished build (`append`)."""
    data = config.data
    if data is None:
        raise BuildError("the config has no data: section (sources, output, ...) to build")
    if append:
        if overwrite or retry_transient:
            raise BuildError("--append adds to a finished build; it does not go with --overwrite or --retry-transient")
        return _append(data, beam_args)
    if retry_transient and appending.has_appends(data):
        raise BuildError(f"{data.output} has had rows appended; --retry-transient redoes a build from its staging, "
                         "which holds only the first build's rows: rebuild with --overwrite to retry them all")
    try:
        plan = make_plan(data, log)
    except SourceError as error:
        raise BuildError(str(error)) from None
    check_apart_from_inputs(data, [planned.file.path for planned in plan.files if planned.file.format != "image"],
                            [folder for source in data.sources for folder in input_folders(source)])
    given_model = _load_tokenizer(data)
    mode = prepare_output(data, overwrite=overwrite, retry_transient=retry_transient)
    try:
        report = _run_pipeline(data, plan, given_model, mode, beam_args, appending.describe_inputs(data, plan))
    except BaseException as error:
        if restore_previous(data):
            log.warning("the build failed; the build it was replacing is back in %s", data.output)
        full = _disk_full(error)
        if full is not None:
            raise BuildError(f"no space left on the device writing {full or data.output}: free some space, then run "
                             "the same command (a build resumes from the chunks it committed)") from None
        raise
    discard_previous(data)
    return report


def _disk_full(error: BaseException) -> Optional[str]:
    """The path a full disk (or quota) refused, "" if unknown; None if `error` is something else.
    Runners re-raise a worker's error in their own, so the whole chain is looked at."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(error.filename or "")
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            found = re.search(r"No space left on device: '([^']+)'", str(error))
            return found.group(1) if found else ""
        error = error.__cause__ or error.__context__
    return None


def _append(data: DataConfig, beam_args: list[str] | None) -> dict[str, Any]:
    """`--append`: build what is new into OUT/.append (resumable like any build), then merge."""
    started = time.monotonic()
    if appending.pending_merge(data):  # an earlier --append was killed while merging: finish it
        log.info("finishing the interrupted append into %s", data.output)
        return appending.merge(data, None)
    wanted = appending.plan_append(data)
    increment = appending.increment_config(data, wanted)
    try:
        plan = make_plan(increment, log, append=wanted)
    except SourceError as error:
        raise BuildError(str(error)) from None
    if not plan.files:
        raise BuildError(f"--append: nothing to add to {data.output}: every source file is as it was built")
    log.info("appending to %s (%s rows there): %s new input rows", data.output, f"{wanted.existing_rows:,}",
             f"{plan.total_rows:,}")
    mode = prepare_output(increment)
    _run_pipeline(increment, plan, _load_tokenizer(increment), mode, beam_args,
                  appending.describe_inputs(increment, plan), existing=(data.output, wanted.old))
    report = appending.merge(data, wanted)
    report["mode"] = "append"
    report["wall_time_s"] = round(time.monotonic() - started, 3)
    return report


def _run_pipeline(data: DataConfig, plan: BuildPlan, given_model: Optional[bytes], mode: Mode,
                  beam_args: list[str] | None, inputs: Optional[dict[str, Any]] = None,
                  existing: Optional[tuple[str, dict[str, Any]]] = None) -> dict[str, Any]:
    log.info("building %s (%s): %s input rows in %s chunks of %s rows from %d file(s)", data.output, mode.value,
             f"{plan.total_rows:,}", f"{plan.total_chunks:,}", f"{data.chunk_rows:,}", len(plan.files))

    options = PipelineOptions(beam_args or [])
    started = time.monotonic()
    with ProgressMonitor(data, plan) as progress:
        with beam.Pipeline(options=options) as pipeline:
            build_pipeline(pipeline, data, plan, given_model, retry_transient=mode is Mode.RETRY, inputs=inputs,
                           existing=existing)
        log.info(progress.line())
    wall = time.monotonic() - started

    report_url = join(data.output, "build_report.json")
    with fsspec.open(report_url, "r") as handle:
        report = json.load(handle)
    if report["problems"]:
        raise BuildError("rows were lost: " + "; ".join(report["problems"]))
    if sum(report["written"].values()) == 0 and existing is None:
        raise BuildError(_empty_build_message(report))
    with fsspec.open(join(data.output, "manifest.json"), "r") as handle:
        _remove_stale_files(data, json.load(handle))
    images = report["written"].get("paired", 0) + report["written"].get("image", 0)
    report["mode"] = mode.value
    report["wall_time_s"] = round(wall, 3)
    report["images_per_s"] = round(images / wall, 2) if wall > 0 else None
    report["rows_per_s"] = round(report["read"] / wall, 2) if wall > 0 else None
    write_json(report_url, report)
    if not data.keep_staging:
        fs, root = fsspec.core.url_to_fs(data.output)
        fs.rm(join(root, STAGING), recursive=True)
    return report
