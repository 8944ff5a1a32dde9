"""The training loader: mixed batches over streams, exact resume, elastic data ranks.

    from .loader import MixedLoader
    loader = MixedLoader(train_config, rank=0, world_size=1)
    for batch in loader.batches(steps=100):      # Batch (trainer.batch): images, packed tokens, kinds, ...
        ...
    state = loader.state_dict()                  # exact resume: MixedLoader(...).load_state_dict(state)

Everything is a pure function of the seed and the batch index, so a resumed run sees exactly
the batches the uninterrupted run would have seen:

- A batch takes an exact number of rows from every stream (trainer.streams) with a positive
  share (largest-remainder apportionment; ties rotate with the batch index). A stream with share
  0 is never read.
- A rank owns `slots` virtual partitions (by default its DataLoader worker count at the first
  run); global batch `i` of a rank is built from slot `i % slots`.
- Streams cycle through epochs independently (text may be on epoch 3 while paired is on 1),
  so every rank can always produce the same number of batches: no DDP hang on uneven shards.
- For training (`step=`), each worker also prepares its batches' forward passes
  (trainer.step_inputs: masks, layouts, kind counts, id digest), so the training process does
  no per-sample work; images leave the workers as uint8 and are normalised on the device.
- DataLoader worker `w` builds the batches `start + w + n * num_workers`; the worker count
  may change on resume, the slot count may not. A run keeps the data ranks of its first start:
  `RankLoaders` lets one process stand for several of them (elastic resume).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from mmae.schemas.config import TrainConfig
from .batch import KIND_CODES, Batch
from .step_stats import sample_digest
from .step_inputs import StepSpec, prepare_parts
from .data_plan import build_streams
from .streams import DataError, RowGroupReader, SlotStream, Stream, seed_of
from .transforms import eval_pixels, train_pixels, truncate_tokens
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger("mmae.data")


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
    step: Optional[StepSpec] = None  # training: prepare each batch's forward passes in the worker
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
        reader = RowGroupReader(skip_errors=plan.skip_errors)
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
            batch = self._collate(step, samples, dropped)
            if plan.step is not None:
                prepare_step(batch, plan.step)
            yield batch
            step += workers

    def _collate(self, step: int, samples: list[tuple[str, dict[str, Any], int]], dropped: int = 0) -> Batch:
        plan = self.plan
        samples.sort(key=lambda sample: KIND_CODES[sample[0]])
        images, image_index, tokens, lengths, kept = [], [], [], [], []
        for kind, row, epoch in samples:
            if kind in ("paired", "image"):
                try:
                    if plan.train:
                        rng = random.Random(seed_of(plan.seed, "augment", row["id"], epoch))
                        view = train_pixels(row["image"], plan.image_size, rng, plan.crop_scale)
                    else:
                        view = eval_pixels(row["image"], plan.image_size)
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
            images=torch.stack(images) if images else torch.empty(0, size, size, 3, dtype=torch.uint8),
            image_index=torch.tensor(image_index, dtype=torch.long),
            tokens=torch.tensor(tokens, dtype=torch.long),
            token_lengths=torch.tensor(lengths, dtype=torch.long),
            epochs=torch.tensor([epoch for _, _, epoch in samples], dtype=torch.long),
            dropped=dropped,
        )


def prepare_step(batch: Batch, spec: StepSpec) -> None:
    """Everything per sample that the step needs, done here in the worker: the forward passes'
    masks and layouts, the kind counts and the id digest (what the metrics report)."""
    batch.step_of = spec.step_of(batch.step)
    batch.parts = prepare_parts(batch, spec, batch.step_of)
    batch.kind_counts = {kind: int((batch.kinds == code).sum()) for kind, code in KIND_CODES.items()}
    batch.digest = sample_digest([batch.ids])
    if spec.per_kind:  # the parts hold copies of the images: do not ship them twice
        batch.images = batch.images[:0]


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
                 slots: Optional[int] = None, split: str = "train", step: Optional[StepSpec] = None) -> None:
        """`train`: random crops (else centre views); `split`: "train", or "validation" (the held-out
        rows or `train.validation.data`, see trainer.data_plan.build_streams); `step`: prepare every
        batch's forward passes for the trainer (trainer.step_inputs) in the workers."""
        self.config = config
        data = build_streams(config, split)
        self.streams, self.fingerprint, self.unopened, self.shards = data.streams, data.fingerprint, data.skipped, data.shards
        self.plan = LoaderPlan(
            streams=self.streams, seed=config.seed, rank=rank, world_size=world_size,
            slots=slots or max(1, config.num_workers), batch_size=config.batch_size,
            window=config.shuffle_window, image_size=config.image_size, crop_scale=tuple(config.crop_scale),
            max_tokens=config.max_text_tokens, train=train, skip_errors=config.data_errors == "skip", step=step,
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
            "shards": [list(shard) for shard in self.shards],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if state["world_size"] != mine["world_size"]:
            raise ValueError(
                f"the checkpoint's loader ran with world_size {state['world_size']}, this run has "
                f"{mine['world_size']}: the data partition would differ; resume with the same number of processes"
            )
        if state["fingerprint"] != mine["fingerprint"]:
            raise ValueError(self._data_changed(state.get("shards")))
        for key in ("seed", "batch_size", "streams"):
            if state[key] != mine[key]:
                raise ValueError(f"the checkpoint's loader {key} is {state[key]!r}, this run's is {mine[key]!r}")
        if state["slots"] != self.plan.slots:
            # The slot count defines the partition; keep the checkpoint's (any worker count works with it).
            self.plan.slots = state["slots"]
        self.consumed = state["batches"]


    def _data_changed(self, saved: Optional[list]) -> str:
        """Why the data is not the checkpoint's, in words, and the two ways on."""
        ways = ("Continue in a new run folder (another train.out), or start a new run from these weights with "
                "train.init_from")
        unopened = (f" This run could not open {', '.join(self.unopened[:3])}"
                    f"{' ...' if len(self.unopened) > 3 else ''}." if self.unopened else "")
        if not saved:  # a checkpoint from before per-shard keys were kept
            return ("the data is not the data this checkpoint trained on (a shard was rebuilt, changed, or became "
                    f"unreadable).{unopened} {ways}")
        before: dict[str, dict[str, str]] = {}
        for data, path, key in saved:
            before.setdefault(data, {})[path] = key
        now: dict[str, dict[str, str]] = {}
        for data, path, key in self.shards:
            now.setdefault(data, {})[path] = key
        parts = []
        for data in list(before) + [data for data in now if data not in before]:
            old, new = before.get(data, {}), now.get(data, {})
            if data not in now:
                parts.append(f"{data} is no longer in train.data")
            elif data not in before:
                parts.append(f"{data} was not in this run's train.data")
            else:
                differ = sum(old.get(path) != key for path, key in new.items()) + len(set(old) - set(new))
                if differ:
                    parts.append(f"the dataset at {data} is not the one this run was trained on: {differ} of "
                                 f"{len(set(old) | set(new))} shard hashes differ")
        if not parts:
            parts.append("the data is not the data this checkpoint trained on (the mix or a skipped shard changed)")
        return "; ".join(parts) + f".{unopened} {ways}"


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
