"""`DownloadChunks`: each chunk's input file -> a committed staging file + small metadata.

One worker process keeps `download.threads` fetch+decode jobs in flight over *all* the chunks it
has been given, and uses each result as it completes: a hanging URL holds one slot for at most
`download.timeout_s` while the other slots move on to the rows after it, in its chunk and in the
next ones. A chunk is committed (written to the staging area) as soon as its last row is done,
whichever chunk that is; at most `MAX_OPEN_CHUNKS` are open at once, which bounds memory.

Every row of the chunk, rejects included, goes into the chunk's staging file, image bytes
straight from the thread pool; what leaves this stage is per chunk (a `ChunkSummary` and packed
image hashes) plus captions for the tokenizer's bounded sample, so no shuffle carries an image
or a per-row record. A chunk already committed by an earlier run is read back (without its
image column) instead of being fetched again.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import apache_beam as beam
from mmae import faults
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from . import staging
from .dedup import KEYS, HashPacker, duplicates_of, image_key
from .neardup import IMAGE_NEAR, hashes_of_thumbnails, image_group, images_band_keys, reason_of
from .fetch import Fetcher, FetchError, FetchResult, is_transient
from .images import ImageReject, process_image
from .inline import InlineImages
from .memory import release_freed_memory
from .records import ChunkKey, ChunkRows, ChunkSummary, Packed, failed, is_reject, kept
from .tokenizer import SampleTexts
from mmae.schemas.config import DataConfig

log = logging.getLogger("mmae.build")

CAPTIONS = "captions"
MAX_OPEN_CHUNKS = 8
# A chunk held open by a few slow or hanging URLs saves its finished rows to a part file every
# SAVE_EVERY_S, so a build killed at any moment loses at most that much work per open chunk.
SAVE_EVERY_S = 0.25
WAIT_S = 0.25  # how long the bundle thread waits for a result before it looks at open chunks

# What leaves this stage per chunk (never per row): its `ChunkSummary`, the stored rows' image
# hashes packed for `FindDuplicates`, and the captions for the tokenizer's bounded sample.


def _looks_like_text(content_type: str) -> bool:
    content_type = content_type.lower()
    return content_type.startswith("text/") or "json" in content_type or "xml" in content_type


def _failed(record: dict[str, Any], error: BaseException) -> dict[str, Any]:
    log.warning("row %s (%s): unexpected %s: %s", record.get("key"), record.get("url"), type(error).__name__, error)
    return failed(record, "processing_error", f"{type(error).__name__}: {error}")


class RowProcessor:
    """The two steps of one record: `fetch` (network, many in flight) and `decode` (CPU: decode,
    check, resize, encode). Neither raises: every failure is a row with a reason."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.fetcher = Fetcher(config.download)
        self.inline = InlineImages(config.download.max_bytes)
        self.hashes = config.quality.near_duplicate_images is not None

    def fetch(self, record: dict[str, Any]) -> FetchResult | dict[str, Any]:
        """The body, or the finished (rejected) row. An image already in the input (a tar
        member, an image column) is read from there, not downloaded."""
        try:
            if record.get("locator"):
                return self.inline.fetch(record["locator"])
            return self.fetcher.fetch(record["url"])
        except FetchError as error:
            return failed(record, error.reason, error.detail)
        except Exception as error:  # a row must never take the build down with it
            return _failed(record, error)

    def decode(self, record: dict[str, Any], result: FetchResult) -> dict[str, Any]:
        try:
            image = process_image(result.data, self.config.image, hashes=self.hashes)
        except ImageReject as error:
            if error.reason == "decode_error" and _looks_like_text(result.content_type):
                return failed(record, "not_image", f"Content-Type {result.content_type}")
            return failed(record, error.reason, error.detail)
        except Exception as error:
            return _failed(record, error)
        return kept(record, image=image.data, image_format=image.format, width=image.width, height=image.height,
                    original_width=image.original_width, original_height=image.original_height,
                    image_sha256=image.sha256, image_thumbnail=image.thumbnail)


@dataclass
class _OpenChunk:
    key: ChunkKey
    url: str
    digest: str
    rows: list[Optional[dict[str, Any]]]  # once saved, without their image bytes
    remaining: int
    unsaved: list[int] = field(default_factory=list)  # done rows not yet in a part file
    parts: list[str] = field(default_factory=list)  # part files to remove once committed
    tables: list[pa.Table] = field(default_factory=list)  # what this run saved, for the commit
    saved_at: float = field(default_factory=time.monotonic)


class _Workers:
    """`count` daemon threads applying `handle` to items of a queue.

    Not a ThreadPoolExecutor: its `submit` takes a lock shared by every executor in the
    process, and with a hundred network threads handing bodies to the decoders that lock,
    not the network, set the pace."""

    def __init__(self, count: int, name: str, handle) -> None:
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.handle = handle
        self.threads = [threading.Thread(target=self._run, name=f"{name}-{index}", daemon=True)
                        for index in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self.handle(*item)

    def put(self, *item) -> None:
        self.queue.put(item)

    def stop(self) -> None:
        for _ in self.threads:
            self.queue.put(None)


class _Window:
    """Rows in flight in one worker process, and the chunks they belong to. Network waits and
    CPU work have separate threads: `download.threads` requests in flight, and as many decoding
    threads as cores (Pillow releases the GIL while it decodes, resizes and encodes), so a
    hundred waiting sockets never compete for the GIL with the decoders.

    A row holds one of `threads` slots from its request until it is decoded: when decoding falls
    behind, fetched bodies would otherwise wait in memory (and a kill would lose them), so
    fetching waits instead. Slots are handed out by the DoFn's thread alone (`submit` queues a
    row, `take` returns a finished one and starts the next), never by a lock the network threads
    wait on: a hundred waiters on one condition cost a fifth of the GIL."""

    def __init__(self, processor: "RowProcessor", threads: int) -> None:
        self.processor = processor
        self.done: "queue.SimpleQueue[tuple[_OpenChunk, int, dict[str, Any]]]" = queue.SimpleQueue()
        self.open_chunks: dict[ChunkKey, _OpenChunk] = {}
        self.in_flight = 0  # submitted and not yet taken
        self.slots = threads
        self.waiting: "collections.deque[tuple[_OpenChunk, int, dict[str, Any]]]" = collections.deque()
        self.decoders = _Workers(os.cpu_count() or 2, "mmae-decode", self._decode)
        self.network = _Workers(threads, "mmae-fetch", self._fetch)

    def submit(self, chunk: "_OpenChunk", index: int, record: dict[str, Any]) -> None:
        self.in_flight += 1
        self.waiting.append((chunk, index, record))
        self._start()

    def take(self, block: bool) -> tuple["_OpenChunk", int, dict[str, Any]]:
        """A finished row (raises queue.Empty after `WAIT_S`, or at once if not `block`)."""
        item = self.done.get(block=block, timeout=WAIT_S if block else None)
        self.in_flight -= 1
        self.slots += 1
        self._start()
        return item

    def _start(self) -> None:
        while self.slots and self.waiting:
            self.slots -= 1
            self.network.put(*self.waiting.popleft())

    def _fetch(self, chunk: "_OpenChunk", index: int, record: dict[str, Any]) -> None:
        """A reject is done here; a body goes on to a decoding thread."""
        try:
            outcome = self.processor.fetch(record)
            if isinstance(outcome, dict):
                self.done.put((chunk, index, outcome))
            else:
                self.decoders.put(chunk, index, record, outcome)
        except BaseException as error:  # never lose a row: in_flight would never reach 0
            self.done.put((chunk, index, _failed(record, error)))

    def _decode(self, chunk: "_OpenChunk", index: int, record: dict[str, Any], fetched: FetchResult) -> None:
        try:
            row = self.processor.decode(record, fetched)
        except BaseException as error:
            row = _failed(record, error)
        self.done.put((chunk, index, row))

    def stop(self) -> None:
        self.network.stop()
        self.decoders.stop()


class DownloadChunkFn(beam.DoFn):
    """`ChunkRows` -> `ChunkSummary`, plus tagged packed image hashes and captions."""

    def __init__(self, config: DataConfig, buckets: int = 1, retry_transient: bool = False) -> None:
        self.config = config
        self.buckets = buckets
        self.retry_transient = retry_transient
        self.fetched = Metrics.counter("mmae", "rows_fetched")
        self.resumed = Metrics.counter("mmae", "chunks_resumed")
        self.committed = Metrics.counter("mmae", "chunks_committed")

    def setup(self) -> None:
        self.processor = RowProcessor(self.config)
        self.window = _Window(self.processor, self.config.download.threads)
        self.committed_here = 0
        self.fault = faults.after_chunks()  # a test's crash point (mmae.faults); a no-op otherwise
        self.sampler = SampleTexts(self.config.tokenizer.sample_size)

    def start_bundle(self) -> None:
        self.sample = self.sampler.create_accumulator()
        self._listings: dict[str, dict[str, list[str]]] = {}

    def teardown(self) -> None:
        self.window.stop()

    # ---------------------------------------------------------------------------------------

    def process(self, element: ChunkRows, duplicates=None) -> Iterator[Any]:
        key = element.chunk
        source = self.config.sources[key.source]
        records = staging.read_input(staging.input_url(self.config.output, source.name, key))
        # Rows the reader rejected, and later copies of a URL or text (FindDuplicates), are done
        # already: never fetched.
        done: dict[int, dict[str, Any]] = {index: record for index, record in enumerate(records) if is_reject(record)}
        for index, detail in duplicates_of(duplicates, key).items():
            done[index] = failed(records[index], reason_of(detail), detail)
        url = staging.chunk_url(self.config.output, source.name, key)
        digest = staging.records_digest(records)
        staged = staging.read_chunk(url, digest)
        if staged is not None:
            redo = [index for index, row in enumerate(staged) if row["reason"] and is_transient(row["reason"])]
            if not (self.retry_transient and redo):
                self.resumed.inc()
                yield from self._outputs(key, staged)
                return
            rows = list(staging.read_rows(url, list(range(len(staged)))))
            self._open(key, url, digest, rows, {index: self._record(rows[index]) for index in redo})
        elif source.kind == "text":
            rows = [done.get(index) or kept(record) for index, record in enumerate(records)]
            self._commit(url, [staging.part_table(enumerate(rows))], len(rows), digest)
            yield from self._outputs(key, rows)
            return
        else:
            rows: list[Optional[dict[str, Any]]] = [done.get(index) for index in range(len(records))]
            parts = self._parts_of(url)
            for index, row in staging.read_parts(parts, digest):
                rows[index] = row
            if all(row is not None for row in rows):
                self._commit(url, [staging.part_table(enumerate(rows))], len(rows), digest, parts)
                yield from self._outputs(key, rows)
                return
            jobs = {index: record for index, record in enumerate(records) if rows[index] is None}
            self._open(key, url, digest, rows, jobs, parts)
        # Hand control back to Beam (for more chunks) as long as enough work is queued to keep
        # every slot busy; block only when too much is open.
        window = self.window
        while window.in_flight > 2 * self.config.download.threads or len(window.open_chunks) > MAX_OPEN_CHUNKS:
            yield from self._wait_for_one()
        yield from self._complete_ready()
        self._save_stuck_chunks()

    def finish_bundle(self) -> Iterator[Any]:
        while self.window.in_flight:
            for output in self._wait_for_one():
                yield _windowed(output)
        if self.sample:  # the tokenizer's sample of this bundle's captions: one element, not one per row
            yield _windowed(beam.pvalue.TaggedOutput(CAPTIONS, self.sample))
            self.sample = self.sampler.create_accumulator()

    def _wait_for_one(self) -> Iterator[Any]:
        try:
            yield from self._complete_one(block=True)
        except queue.Empty:
            pass
        self._save_stuck_chunks()

    def _save_stuck_chunks(self) -> None:
        """Write the finished rows of chunks still waiting on others to a part file."""
        now = time.monotonic()
        for chunk in self.window.open_chunks.values():
            if chunk.unsaved and now - chunk.saved_at >= SAVE_EVERY_S:
                self._save(chunk)
                chunk.saved_at = now

    @staticmethod
    def _save(chunk: _OpenChunk) -> None:
        _hash_images(chunk.rows[index] for index in chunk.unsaved)
        table = staging.part_table((index, chunk.rows[index]) for index in chunk.unsaved)
        part = staging.part_url(chunk.url, len(chunk.parts))
        staging.write_part(part, table, chunk.digest)
        chunk.parts.append(part)
        chunk.tables.append(table)
        for index in chunk.unsaved:
            chunk.rows[index].pop("image", None)  # the table holds them now
        chunk.unsaved = []

    def _parts_of(self, url: str) -> list[str]:
        """Part files an earlier, interrupted run left for this chunk (one listing per folder)."""
        folder = url.rsplit("/", 1)[0]
        if folder not in self._listings:
            self._listings[folder] = staging.list_parts(folder)
        return self._listings[folder].get(url, [])

    # ---------------------------------------------------------------------------------------

    def _commit(self, url: str, tables: list[pa.Table], count: int, digest: str,
                parts: Optional[list[str]] = None) -> None:
        staging.write_chunk(url, tables, count, digest)
        staging.remove_parts(parts or [])
        release_freed_memory()
        self.committed.inc()
        self.committed_here += 1
        self.fault(self.committed_here)

    @staticmethod
    def _record(row: dict[str, Any]) -> dict[str, Any]:
        fields = ("id", "source", "kind", "key", "url", "caption", "label")
        return {name: row.get(name) for name in fields}

    def _open(self, key, url, digest, rows, jobs: dict[int, dict[str, Any]], parts: Optional[list[str]] = None) -> None:
        # Rows done before this run (reader rejects, duplicates, an earlier run's parts or
        # chunk) go into this run's first part file or the commit, with the fetched ones.
        done = [index for index in range(len(rows)) if index not in jobs]
        chunk = _OpenChunk(key, url, digest, rows, remaining=len(jobs), unsaved=done, parts=list(parts or []))
        self.window.open_chunks[key] = chunk
        for index, record in jobs.items():
            self.window.submit(chunk, index, record)

    def _complete_ready(self) -> Iterator[Any]:
        while True:
            try:
                yield from self._complete_one(block=False)
            except queue.Empty:
                return

    def _complete_one(self, block: bool) -> Iterator[Any]:
        chunk, index, row = self.window.take(block)
        chunk.rows[index] = row
        chunk.unsaved.append(index)
        chunk.remaining -= 1
        self.fetched.inc()
        if chunk.remaining == 0:
            del self.window.open_chunks[chunk.key]
            _hash_images(chunk.rows[index] for index in chunk.unsaved)
            tables = chunk.tables + [staging.part_table((index, chunk.rows[index]) for index in chunk.unsaved)]
            self._commit(chunk.url, tables, len(chunk.rows), chunk.digest, chunk.parts)
            yield from self._outputs(chunk.key, chunk.rows)

    def _outputs(self, key: ChunkKey, rows: list[dict[str, Any]]) -> Iterator[Any]:
        stored = 0
        packer = HashPacker(self.buckets)
        hashed: list[int] = []  # rows with perceptual hashes
        for index, row in enumerate(rows):
            if row.get("reason"):
                continue
            stored += 1
            if row.get("caption") is not None:
                self.sample = self.sampler.add_input(self.sample, row["caption"])
            if row["kind"] != "text":
                packer.add(image_key(row["kind"], row["image_sha256"], row.get("caption")), index, row["id"])
                if row.get("image_phashes"):
                    hashed.append(index)
        yield ChunkSummary(key, len(rows), stored)
        for bucket, packed in packer.items():
            yield beam.pvalue.TaggedOutput(KEYS, (bucket, Packed(key, "image", packed)))
        if self.config.quality.near_duplicate_images is not None:
            near = HashPacker(self.buckets)
            high, low, owner = images_band_keys([rows[index]["image_phashes"] for index in hashed],
                                                [image_group(rows[index]["kind"], rows[index].get("caption"))
                                                 for index in hashed])
            near.add_many(high, low, owner, hashed, [rows[index]["id"] for index in hashed])
            url = staging.keys_url(self.config.output, self.config.sources[key.source].name, key, "near-image")
            for bucket, place in near.spill(url):
                yield beam.pvalue.TaggedOutput(KEYS, (bucket, Packed(key, IMAGE_NEAR, place)))


def _hash_images(rows: Iterator[dict[str, Any]]) -> None:
    """The perceptual hashes of rows decoded since the last save, as one batch (numpy over all
    of them at once, in this thread, instead of per image in the decoding threads, where small
    numpy calls would hold the GIL); their grey thumbnails go once hashed."""
    waiting = [row for row in rows if row.get("image_thumbnail") is not None]
    thumbnails = [row.pop("image_thumbnail") for row in waiting]
    for row, hashes in zip(waiting, hashes_of_thumbnails(thumbnails)):
        row["image_phashes"], row["image_phash"] = hashes, hashes[0] if hashes else None


def _windowed(output: Any) -> Any:
    if isinstance(output, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(output.tag, WindowedValue(output.value, MIN_TIMESTAMP, [GlobalWindow()]))
    return WindowedValue(output, MIN_TIMESTAMP, [GlobalWindow()])


class DownloadChunks(beam.PTransform):
    """`ChunkRows` -> committed staging files; outputs: main (`ChunkSummary`), `KEYS` (packed
    image hashes) and captions. `duplicates`: FindDuplicates' (chunk, duplicates), rejected
    without being fetched."""

    def __init__(self, config: DataConfig, duplicates=None, buckets: int = 1, retry_transient: bool = False) -> None:
        super().__init__()
        self.config = config
        self.duplicates = duplicates
        self.buckets = buckets
        self.retry_transient = retry_transient

    def expand(self, chunks):
        duplicates = self.duplicates
        if duplicates is None:
            duplicates = chunks.pipeline | "NoDuplicates" >> beam.Create([])
        return (
            chunks
            # Chunks come from few readers: spread them over the workers before downloading.
            | "Spread" >> beam.Reshuffle()
            | "Fetch" >> beam.ParDo(DownloadChunkFn(self.config, self.buckets, self.retry_transient),
                                   beam.pvalue.AsMultiMap(duplicates)).with_outputs(KEYS, CAPTIONS, main="summaries")
        )
