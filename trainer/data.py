"""Streaming loader with mixed-batch sampling over mmae shards.

    from trainer.data import MixedLoader
    loader = MixedLoader(train_config, rank=0, world_size=1)
    for batch in loader.batches(steps=100):      # Batch: images, packed tokens, kinds, ...
        ...
    state = loader.state_dict()                  # exact resume: MixedLoader(...).load_state_dict(state)

How batches are made (everything is a pure function of the seed and the batch index, so a
resumed run sees exactly the batches the uninterrupted run would have seen):

- Each kind (or, with `source_weights`, each source inside a kind) is a *stream*. A batch
  takes an exact number of rows from every stream with a positive share (largest-remainder
  apportionment; ties rotate with the batch index). A stream with share 0 is never read.
- A rank owns `slots` virtual partitions (by default its DataLoader worker count at the first
  run); global batch `i` of a rank is built from slot `i % slots`. In epoch `e` of a stream,
  its row groups are shuffled by `(seed, stream, e)` and dealt round-robin to the
  `world_size * slots` global slots (split into strided row sets when there are fewer row
  groups than slots), so within a stream epoch no row is seen twice or skipped.
- Inside a slot's epoch, rows are permuted within consecutive windows of `shuffle_window`
  rows: a bounded shuffle buffer whose order is computed, not stored. Memory holds about one
  window per stream, whatever the dataset size.
- Streams cycle through epochs independently (text may be on epoch 3 while paired is on 1),
  so every rank can always produce the same number of batches: no DDP hang on uneven shards.
- DataLoader worker `w` builds the batches `start + w + n * num_workers`; the worker count
  may change on resume, the world size and slot count may not (a clear error says so).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schemas.config import TrainConfig
from trainer.transforms import eval_view, train_view, truncate_tokens

log = logging.getLogger("mmae.data")

KINDS = ("paired", "image", "text")
KIND_CODES = {"paired": 0, "image": 1, "text": 2}
COLUMNS = {
    "paired": ["id", "source", "tokens", "image", "label"],
    "image": ["id", "source", "image", "label"],
    "text": ["id", "source", "tokens", "label"],
}


class DataError(RuntimeError):
    """A shard that cannot be read; the message names the file (and row group)."""


def _seed(*parts: Any) -> int:
    text = "\x00".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def apportion(total: int, weights: list[float], rotation: int) -> list[int]:
    """Split `total` into integers proportional to `weights` (all positive weights get their
    floor); the remainder goes by largest fraction, and entries tied on the fraction take turns
    by `rotation`, so over consecutive batches each gets its long-run share."""
    weight_sum = sum(weights)
    raw = [total * weight / weight_sum for weight in weights]
    counts = [math.floor(value) for value in raw]
    remainder = total - sum(counts)
    candidates = sorted((index for index in range(len(weights)) if weights[index] > 0),
                        key=lambda index: (-round(raw[index] - counts[index], 9), index))
    position = 0
    while remainder > 0 and position < len(candidates):
        fraction = round(raw[candidates[position]] - counts[candidates[position]], 9)
        group = [index for index in candidates[position:] if round(raw[index] - counts[index], 9) == fraction]
        if len(group) <= remainder:
            chosen = group
        else:
            start = rotation % len(group)
            chosen = [group[(start + offset) % len(group)] for offset in range(remainder)]
        for index in chosen:
            counts[index] += 1
        remainder -= len(chosen)
        position += len(group)
    return counts


# ------------------------------------------------------------------------------------------
# Index: which row groups exist (footers only), built once in the main process.


@dataclass(frozen=True)
class Stream:
    """The rows of one kind (or one source of a kind) and their share of every batch."""

    kind: str
    source: Optional[str]
    urls: tuple[str, ...]  # per row group
    groups: tuple[int, ...]  # row-group index in its file
    rows: tuple[int, ...]  # rows of this stream in each row group
    share: float

    @property
    def name(self) -> str:
        return self.kind if self.source is None else f"{self.kind}/{self.source}"

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def _open_parquet(url: str) -> pq.ParquetFile:
    return pq.ParquetFile(fsspec.open(url, "rb").open())


def read_manifest(dataset: str) -> dict[str, Any]:
    url = dataset.rstrip("/") + "/manifest.json"
    try:
        with fsspec.open(url, "r", encoding="utf-8") as handle:
            import json

            return json.load(handle)
    except FileNotFoundError:
        raise DataError(f"{dataset}: no manifest.json (run `mmae build` first)") from None


def build_streams(config: TrainConfig) -> tuple[list[Stream], str]:
    """Read the manifest and the footer of every shard a positive share needs.

    Returns the streams and a fingerprint of the data (shard hashes), which checkpoints keep.
    """
    manifest = read_manifest(config.data)
    shares = config.mix.shares()
    root = config.data.rstrip("/")
    streams: list[Stream] = []
    skipped: list[str] = []
    fingerprint = hashlib.sha256()
    for kind in KINDS:
        if shares[kind] <= 0:
            continue  # never read, not even opened
        entries = [entry for entry in manifest["shards"] if entry["kind"] == kind and entry["rows"]]
        split_by_source = any(name in config.source_weights for name in _sources_of(manifest, kind))
        per_source: dict[Optional[str], tuple[list, list, list]] = {}
        for entry in entries:
            url = f"{root}/{entry['path']}"
            fingerprint.update(entry["sha256"].encode())
            try:
                with fsspec.open(url, "rb") as handle, pq.ParquetFile(handle) as parquet:
                    metadata = parquet.metadata
                    sources = None
                    if split_by_source:
                        sources = parquet.read(columns=["source"]).column("source").to_pylist()
            except (OSError, pa.ArrowException) as error:
                if config.data_errors == "skip":
                    skipped.append(url)
                    log.warning("skipping unreadable shard %s (%s)", url, error)
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
                    urls, groups, rows = per_source.setdefault(name, ([], [], []))
                    urls.append(url)
                    groups.append(group)
                    rows.append(count)
        weights = {name: (config.source_weights.get(name, 1.0) if name is not None else 1.0) for name in per_source}
        weight_sum = sum(weights.values())
        for name in sorted(per_source, key=lambda value: value or ""):
            if weights[name] <= 0:
                continue
            urls, groups, rows = per_source[name]
            streams.append(Stream(kind, name, tuple(urls), tuple(groups), tuple(rows),
                                  shares[kind] * weights[name] / weight_sum))
        if not any(stream.kind == kind for stream in streams):
            raise DataError(f"{config.data}: train.mix.{kind} is {shares[kind]:.3f} but there are no {kind} rows to read")
    if skipped:
        log.warning("%d shard(s) skipped (train.data_errors: skip): %s", len(skipped), ", ".join(skipped))
    return streams, fingerprint.hexdigest()[:16]


def _sources_of(manifest: dict[str, Any], kind: str) -> set[str]:
    names = set()
    for source in manifest.get("config", {}).get("sources", []):
        if source.get("kind") == kind:
            names.add(source["name"])
    return names


# ------------------------------------------------------------------------------------------
# One slot's view of one stream: an endless sequence of rows, epoch after epoch.


@dataclass(frozen=True)
class Chunk:
    index: int  # row group index within the stream
    part: int  # rows [part::parts] of that row group
    parts: int
    rows: int


class SlotStream:
    """The rows of `stream` that global slot `slot` (of `slots`) reads, in order, forever."""

    def __init__(self, stream: Stream, seed: int, slot: int, slots: int, window: int, reader: "ChunkReader") -> None:
        if stream.total_rows < slots:
            raise DataError(f"{stream.name} has {stream.total_rows} rows, fewer than the {slots} "
                            "ranks x slots that share it")
        self.stream, self.seed, self.slot, self.slots, self.window = stream, seed, slot, slots, window
        self.reader = reader
        self.epoch = 0
        self.epoch_start = 0  # global position where self.epoch begins
        self._plan = self._epoch_plan(0)
        self._loaded: dict[int, list[dict[str, Any]]] = {}  # chunk number -> rows
        self._window_index = -1
        self._window_start = 0
        self._order: list[int] = []

    def _epoch_plan(self, epoch: int) -> tuple[list[Chunk], list[int]]:
        stream = self.stream
        order = list(range(len(stream.rows)))
        random.Random(_seed(self.seed, stream.name, epoch)).shuffle(order)
        parts = 1 if len(order) >= self.slots else math.ceil(self.slots / len(order))
        every = [Chunk(index, part, parts, len(range(part, stream.rows[index], parts)))
                 for index in order for part in range(parts)]
        mine = [chunk for chunk in every[self.slot::self.slots] if chunk.rows > 0]
        ends = []
        total = 0
        for chunk in mine:
            total += chunk.rows
            ends.append(total)
        return mine, ends

    def _length(self) -> int:
        ends = self._plan[1]
        return ends[-1] if ends else 0

    def _advance_epoch(self) -> None:
        self.epoch_start += self._length()
        self.epoch += 1
        self._plan = self._epoch_plan(self.epoch)
        self._loaded.clear()
        self._window_index = -1

    def _seek(self, position: int) -> int:
        """Move to the epoch containing global `position`; return the offset inside it."""
        if position < self.epoch_start:  # rewinding (rare): start over
            self.epoch, self.epoch_start = 0, 0
            self._plan = self._epoch_plan(0)
            self._loaded.clear()
            self._window_index = -1
        empty_epochs = 0
        while position >= self.epoch_start + self._length():
            empty_epochs = empty_epochs + 1 if self._length() == 0 else 0
            if empty_epochs > 1000:
                raise DataError(f"{self.stream.name}: slot {self.slot} never receives rows")
            self._advance_epoch()
        return position - self.epoch_start

    def _row(self, offset: int) -> dict[str, Any]:
        window_index = offset // self.window
        if window_index != self._window_index:
            self._enter_window(window_index)
        target = self._window_start + self._order[offset - self._window_start]
        ends = self._plan[1]
        number = bisect.bisect_right(ends, target)
        start = ends[number - 1] if number else 0
        return self._chunk_rows(number)[target - start]

    def _enter_window(self, window_index: int) -> None:
        """Fix this window's permutation; keep only the chunks it needs; read ahead the next's."""
        start = window_index * self.window
        length = min(self.window, self._length() - start)
        self._order = list(range(length))
        random.Random(_seed(self.seed, self.stream.name, self.epoch, self.slot, window_index)).shuffle(self._order)
        self._window_start = start
        needed = self._chunks_between(start, start + length)
        for number in list(self._loaded):
            if number not in needed:
                del self._loaded[number]
        chunks = self._plan[0]
        for number in sorted(self._chunks_between(start + length, start + length + self.window) - needed):
            self.reader.prefetch(self.stream, chunks[number])
        self._window_index = window_index

    def _chunks_between(self, begin: int, end: int) -> set[int]:
        ends = self._plan[1]
        if begin >= end or not ends:
            return set()
        first = bisect.bisect_right(ends, begin)
        last = bisect.bisect_right(ends, end - 1)
        return set(range(first, min(last, len(ends) - 1) + 1))

    def _chunk_rows(self, number: int) -> list[dict[str, Any]]:
        if number not in self._loaded:
            self._loaded[number] = self.reader.read(self.stream, self._plan[0][number])
        return self._loaded[number]

    def take(self, position: int, count: int) -> list[tuple[dict[str, Any], int]]:
        """Rows at global positions [position, position + count), each with its epoch."""
        out = []
        for current in range(position, position + count):
            offset = self._seek(current)
            out.append((self._row(offset), self.epoch))
        return out


class ChunkReader:
    """Reads row groups (projected columns) with a small read-ahead pool; per worker process."""

    def __init__(self, skip_errors: bool = False, read_ahead: int = 2) -> None:
        self.skip_errors = skip_errors
        self._files: dict[str, pq.ParquetFile] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix="mmae-read")
        self._pending: dict[tuple, Any] = {}

    def _read_now(self, stream: Stream, chunk: Chunk) -> list[dict[str, Any]]:
        url, group = stream.urls[chunk.index], stream.groups[chunk.index]
        with self._guard:
            lock = self._locks.setdefault(url, threading.Lock())
        try:
            with lock:  # a ParquetFile is not safe to read from two threads at once
                parquet = self._files.get(url)
                if parquet is None:
                    parquet = self._files[url] = _open_parquet(url)
                table = parquet.read_row_group(group, columns=COLUMNS[stream.kind])
        except (OSError, pa.ArrowException) as error:
            message = f"{url}: cannot read row group {group} ({type(error).__name__}: {error})"
            if not self.skip_errors:
                raise DataError(message) from None
            # Placeholders keep every later position where it was: the plan (and so resume) is unchanged.
            log.warning("skipping %d rows (train.data_errors: skip): %s", chunk.rows, message)
            return [None] * chunk.rows
        rows = table.to_pylist()
        if stream.source is not None:
            rows = [row for row in rows if row["source"] == stream.source]
        return rows[chunk.part::chunk.parts]

    def prefetch(self, stream: Stream, chunk: Chunk) -> None:
        key = (stream.name, chunk)
        if key not in self._pending and len(self._pending) < 8:
            self._pending[key] = self._pool.submit(self._read_now, stream, chunk)

    def read(self, stream: Stream, chunk: Chunk) -> list[dict[str, Any]]:
        pending = self._pending.pop((stream.name, chunk), None)
        return pending.result() if pending is not None else self._read_now(stream, chunk)


# ------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One mixed batch. Samples are grouped paired, then image, then text."""

    step: int  # the rank's batch index
    ids: list[str]
    kinds: torch.Tensor  # [B] 0 paired, 1 image, 2 text
    sources: list[str]
    labels: list[Optional[str]]
    images: torch.Tensor  # [N_img, 3, H, W] for the samples that have one
    image_index: torch.Tensor  # [B] row in `images`, -1 for text-only
    tokens: torch.Tensor  # [sum(token_lengths)] packed, no padding
    token_lengths: torch.Tensor  # [B] 0 for image-only
    epochs: torch.Tensor  # [B] the stream epoch each sample came from
    dropped: int = 0  # samples of this batch lost to unreadable data (train.data_errors: skip)

    def counts(self) -> dict[str, int]:
        return {kind: int((self.kinds == code).sum()) for kind, code in KIND_CODES.items()}

    def padded_tokens(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, max_len] token ids and a bool mask of real tokens (for padded attention)."""
        rows = torch.split(self.tokens, self.token_lengths.tolist())
        width = max(1, int(self.token_lengths.max())) if len(rows) else 1
        out = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for index, row in enumerate(rows):
            out[index, : len(row)] = row
        mask = torch.arange(width)[None, :] < self.token_lengths[:, None]
        return out, mask

    def select(self, indices: list[int]) -> "Batch":
        """A batch of some of this batch's samples (in the given order)."""
        token_rows = torch.split(self.tokens, self.token_lengths.tolist())
        image_rows = [int(self.image_index[i]) for i in indices]
        kept_images = [row for row in image_rows if row >= 0]
        new_index, next_row = [], 0
        for row in image_rows:
            new_index.append(next_row if row >= 0 else -1)
            next_row += row >= 0
        return Batch(
            step=self.step,
            ids=[self.ids[i] for i in indices],
            kinds=self.kinds[indices],
            sources=[self.sources[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            images=self.images[kept_images] if kept_images else self.images[:0],
            image_index=torch.tensor(new_index, dtype=torch.long),
            tokens=torch.cat([token_rows[i] for i in indices]) if indices else self.tokens[:0],
            token_lengths=self.token_lengths[indices],
            epochs=self.epochs[indices],
        )

    def without_text(self) -> "Batch":
        """The same samples with every token dropped (the MAE baseline uses captions as nothing)."""
        return Batch(step=self.step, ids=self.ids, kinds=self.kinds, sources=self.sources, labels=self.labels,
                     images=self.images, image_index=self.image_index, tokens=self.tokens[:0],
                     token_lengths=torch.zeros_like(self.token_lengths), epochs=self.epochs,
                     dropped=self.dropped)

    def pin_memory(self) -> "Batch":
        for name in ("kinds", "images", "image_index", "tokens", "token_lengths", "epochs"):
            setattr(self, name, getattr(self, name).pin_memory())
        return self

    def to(self, device, non_blocking: bool = True) -> "Batch":
        for name in ("kinds", "images", "image_index", "tokens", "token_lengths", "epochs"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=non_blocking))
        return self


@dataclass
class LoaderPlan:
    """What a rank's batch `i` is made of; picklable, shipped to every worker."""

    streams: list[Stream]
    seed: int
    rank: int
    world_size: int
    slots: int
    batch_size: int
    window: int
    image_size: int
    crop_scale: tuple[float, float]
    max_tokens: int
    train: bool = True
    skip_errors: bool = False
    period: int = field(init=False)

    def __post_init__(self) -> None:
        # Tie rotation repeats with the size of the tied group (at most the number of streams).
        self.period = math.lcm(*range(1, len(self.streams) + 1)) if self.streams else 1
        self._per_period: dict[int, list[int]] = {}

    def counts(self, step: int) -> list[int]:
        return apportion(self.batch_size, [stream.share for stream in self.streams], step)

    def positions(self, step: int) -> list[int]:
        """Rows each stream of slot `step % slots` has used before the rank's batch `step`."""
        slot, local = step % self.slots, step // self.slots
        full, rest = divmod(local, self.period)
        if slot not in self._per_period:
            sums = [0] * len(self.streams)
            for t in range(self.period):
                for index, count in enumerate(self.counts(slot + t * self.slots)):
                    sums[index] += count
            self._per_period[slot] = sums
        positions = [full * value for value in self._per_period[slot]]
        for t in range(rest):
            for index, count in enumerate(self.counts(slot + (full * self.period + t) * self.slots)):
                positions[index] += count
        return positions


class MixedStreamDataset(IterableDataset):
    """Yields the rank's batches `start, start+1, ...` (split over DataLoader workers)."""

    def __init__(self, plan: LoaderPlan, start: int = 0, count: Optional[int] = None) -> None:
        super().__init__()
        self.plan, self.start, self.count = plan, start, count

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        plan = self.plan
        reader = ChunkReader(skip_errors=plan.skip_errors)
        slot_streams: dict[tuple[int, int], SlotStream] = {}
        step = self.start + worker
        end = None if self.count is None else self.start + self.count
        while end is None or step < end:
            slot = step % plan.slots
            global_slot = plan.rank * plan.slots + slot
            samples, dropped = [], 0
            for index, (stream, count, position) in enumerate(
                zip(plan.streams, plan.counts(step), plan.positions(step))
            ):
                if not count:
                    continue
                key = (index, slot)
                if key not in slot_streams:
                    slot_streams[key] = SlotStream(stream, plan.seed, global_slot, plan.world_size * plan.slots,
                                                   plan.window, reader)
                for row, epoch in slot_streams[key].take(position, count):
                    if row is None:  # its row group could not be read (train.data_errors: skip)
                        dropped += 1
                    else:
                        samples.append((stream.kind, row, epoch))
            yield self._collate(step, samples, dropped)
            step += workers

    def _collate(self, step: int, samples: list[tuple[str, dict[str, Any], int]], dropped: int = 0) -> Batch:
        plan = self.plan
        samples.sort(key=lambda sample: KIND_CODES[sample[0]])
        images, image_index, tokens, lengths, kept = [], [], [], [], []
        for kind, row, epoch in samples:
            if kind in ("paired", "image"):
                try:
                    if plan.train:
                        rng = random.Random(_seed(plan.seed, "augment", row["id"], epoch))
                        view = train_view(row["image"], plan.image_size, rng, plan.crop_scale)
                    else:
                        view = eval_view(row["image"], plan.image_size)
                except Exception as error:  # noqa: BLE001 - name the row, whatever the decoder raised
                    message = f"row {row['id']} ({kind}): image does not decode ({error})"
                    if not plan.skip_errors:
                        raise DataError(message) from None
                    log.warning("skipping a sample (train.data_errors: skip): %s", message)
                    dropped += 1
                    continue
                image_index.append(len(images))
                images.append(view)
            else:
                image_index.append(-1)
            row_tokens = truncate_tokens(row.get("tokens"), plan.max_tokens) if kind != "image" else []
            tokens.extend(row_tokens)
            lengths.append(len(row_tokens))
            kept.append((kind, row, epoch))
        if not kept:
            raise DataError(f"batch {step}: none of its {dropped} samples could be read (train.data_errors: skip)")
        samples = kept
        size = plan.image_size
        return Batch(
            step=step,
            ids=[row["id"] for _, row, _ in samples],
            kinds=torch.tensor([KIND_CODES[kind] for kind, _, _ in samples], dtype=torch.long),
            sources=[row["source"] for _, row, _ in samples],
            labels=[row.get("label") for _, row, _ in samples],
            images=torch.stack(images) if images else torch.empty(0, 3, size, size),
            image_index=torch.tensor(image_index, dtype=torch.long),
            tokens=torch.tensor(tokens, dtype=torch.long),
            token_lengths=torch.tensor(lengths, dtype=torch.long),
            epochs=torch.tensor([epoch for _, _, epoch in samples], dtype=torch.long),
            dropped=dropped,
        )


def _identity(batch: Batch) -> Batch:
    return batch


def _ignore_stop_signals(_worker: int) -> None:
    """Ctrl-C and SIGTERM reach the whole process group: the trainer finishes its step, saves and
    shuts its DataLoader workers down itself; a worker that died first would fail that step."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class MixedLoader:
    """The rank's loader: a DataLoader over MixedStreamDataset plus exact-resume state."""

    def __init__(self, config: TrainConfig, rank: int = 0, world_size: int = 1, train: bool = True,
                 slots: Optional[int] = None) -> None:
        self.config = config
        self.streams, self.fingerprint = build_streams(config)
        self.plan = LoaderPlan(
            streams=self.streams, seed=config.seed, rank=rank, world_size=world_size,
            slots=slots or max(1, config.num_workers), batch_size=config.batch_size,
            window=config.shuffle_window, image_size=config.image_size, crop_scale=tuple(config.crop_scale),
            max_tokens=config.max_text_tokens, train=train, skip_errors=config.data_errors == "skip",
        )
        self.consumed = 0  # batches handed to the caller

    def describe(self) -> str:
        counts = self.plan.counts(0)
        parts = [f"{stream.name}: {count}/batch of {stream.total_rows} rows" for stream, count in
                 zip(self.streams, counts)]
        return "; ".join(parts)

    def batches(self, steps: Optional[int] = None) -> Iterator[Batch]:
        """Batches from where the loader stands; `steps` more (or forever)."""
        dataset = MixedStreamDataset(self.plan, start=self.consumed, count=steps)
        workers = self.config.num_workers
        loader = DataLoader(
            dataset, batch_size=None, collate_fn=_identity, num_workers=workers,
            prefetch_factor=self.config.prefetch_factor if workers else None,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if workers else None,
        )
        for batch in loader:
            if batch.step != self.consumed:
                raise RuntimeError(f"loader out of order: got batch {batch.step}, expected {self.consumed}")
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.consumed,
            "seed": self.plan.seed,
            "world_size": self.plan.world_size,
            "slots": self.plan.slots,
            "batch_size": self.plan.batch_size,
            "streams": [(stream.name, round(stream.share, 9)) for stream in self.streams],
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if state["world_size"] != mine["world_size"]:
            raise ValueError(
                f"the checkpoint's loader ran with world_size {state['world_size']}, this run has "
                f"{mine['world_size']}: the data partition would differ; resume with the same number of processes"
            )
        for key in ("seed", "batch_size", "streams", "fingerprint"):
            if state[key] != mine[key]:
                raise ValueError(f"the checkpoint's loader {key} is {state[key]!r}, this run's is {mine[key]!r}")
        if state["slots"] != self.plan.slots:
            # The slot count defines the partition; keep the checkpoint's (any worker count works with it).
            self.plan.slots = state["slots"]
        self.consumed = state["batches"]


class RankLoaders:
    """The loaders of the data ranks this process stands for, and the micro-batches of a step.

    Normally one: the process's own rank. After an elastic resume on fewer processes, several:
    a run started on W processes keeps W data ranks for good, and a process standing for k of
    them takes `grad_accum / k` micro-batches from each, so every global step reads exactly the
    samples it read before (the partition is the data ranks', never the processes')."""

    def __init__(self, loaders: list[MixedLoader], micro_per_loader: int) -> None:
        self.loaders = loaders
        self.micro = micro_per_loader

    def describe(self) -> str:
        return self.loaders[0].describe()

    def state_dict(self) -> dict[str, Any]:
        return self.loaders[0].state_dict()  # every data rank has consumed the same batches

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for loader in self.loaders:
            loader.load_state_dict(state)

    def steps(self, count: int) -> Iterator[list[Batch]]:
        """The micro-batches of the next `count` steps, one list per step."""
        streams = [loader.batches(count * self.micro) for loader in self.loaders]
        for _ in range(count):
            yield [next(stream) for stream in streams for _ in range(self.micro)]
