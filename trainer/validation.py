"""Validation loss on data the run never trains on (`train.validation`).

The same `validation.batches` batches every time (centre views, the run's main mix, masks from
a fixed seed), split over the process's data ranks like training data: figures are comparable
from one validation to the next and identical in a resumed or elastic run. All ranks take part
(FSDP gathers parameters, ITC gathers features); the sums are reduced over ranks.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from mmae.schemas.config import TrainConfig
from .batch import Batch, Inputs
from .loader import MixedLoader
from .layout import Layout
from .objectives import LOSS_NAMES
from .parallel import Distributed, sum_over_ranks
from .stages import mix_of


class Validator:
    def __init__(self, config: TrainConfig, env: Distributed) -> None:
        self.config, self.env = config, env
        self.sample: Optional[tuple[Inputs, Layout]] = None  # the last validation's first batch
        self._loaders: tuple[tuple, list[MixedLoader]] = ((), [])

    def prepare(self, data_ranks: list[int], data_world: int) -> None:
        """Open the validation data once (footers, and ids for a hold-out split), at the start of
        the run: a missing or empty validation set is an error before any training step."""
        key = (tuple(data_ranks), data_world)
        if self._loaders[0] != key:
            config = self.config.model_copy(update={"mix": mix_of(self.config, None), "num_workers": 0})
            self._loaders = (key, [MixedLoader(config, rank=rank, world_size=data_world, train=False, slots=1,
                                               split="validation") for rank in data_ranks])

    def batches(self, data_ranks: list[int], data_world: int) -> Iterator[Batch]:
        self.prepare(data_ranks, data_world)
        for loader in self._loaders[1]:
            loader.consumed = 0  # the same batches every time
            yield from loader.batches(self.config.validation.batches)

    @torch.no_grad()
    def run(self, model, step: int, data_ranks: list[int], data_world: int, autocast) -> dict[str, Any]:
        """Mean losses over the validation batches of every rank: a `"split": "validation"` record."""
        config = self.config
        sums, batches, samples, first = dict.fromkeys(LOSS_NAMES, 0.0), 0, 0, None
        for batch in self.batches(data_ranks, data_world):
            if not config.use_text:
                batch = batch.without_text()
            inputs = batch.to(self.env.device).inputs()
            layout = model.layout(inputs, config.masking, config.seed)
            with autocast:
                losses = model(inputs, layout, weights=config.loss_weights, seed=config.seed)
            for name in LOSS_NAMES:
                value = getattr(losses, name)
                sums[name] += float(value) if value is not None else 0.0
            batches, samples = batches + 1, samples + len(batch.ids)
            first = first or (inputs, layout)
        totals = sum_over_ranks([*(sums[name] for name in LOSS_NAMES), batches, samples], self.env)
        count = max(1.0, totals[len(LOSS_NAMES)])
        self.sample = first
        return {"step": step, "split": "validation",
                **{name: totals[index] / count for index, name in enumerate(LOSS_NAMES)}, "samples": int(totals[-1])}

    def picture(self, model):
        """A reconstruction grid of the last validation's first samples (None before any)."""
        if self.sample is None:
            return None
        from .reconstruction import render

        inputs, layout = self.sample
        return render(model, inputs, layout, limit=4)
