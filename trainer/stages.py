"""A run's curriculum: stages with their own length, data mix, objectives and frozen modules
(MoMo, VLMo), or one stage of the whole run when `train.stages` is empty.

Recipe switches resolved here: the MAE baseline (`use_text: false`) reads the same images with
captions dropped and no text-only rows; each stage gets its own data order (seed + 1009 * index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mmae.schemas.config import LossWeightsConfig, MixConfig, StageConfig, TrainConfig


@dataclass(frozen=True)
class Stage:
    index: int
    start: int  # first step
    end: int  # one past the last step
    config: Optional[StageConfig]  # None: the run has no stages

    @property
    def name(self) -> str:
        if self.config is None:
            return ""
        return f"stage {self.index}" + (f" ({self.config.name})" if self.config.name else "")

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(self.config.frozen) if self.config is not None else ()


def plan_stages(config: TrainConfig) -> list[Stage]:
    stages, start = [], 0
    for index, stage in enumerate(config.stages or [None]):
        end = start + (stage.steps if stage is not None else config.steps)
        stages.append(Stage(index, start, end, stage))
        start = end
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    for stage in stages:
        if stage.start <= step < stage.end:
            return stage
    return stages[-1]


def mix_of(config: TrainConfig, stage: Optional[Stage]) -> MixConfig:
    mix = stage.config.mix if stage is not None and stage.config is not None else config.mix
    if not config.use_text:
        # MAE baseline: the same images (paired ones too, captions dropped); no text-only rows.
        mix = mix.model_copy(update={"text": 0.0})
    return mix


def loader_config(config: TrainConfig, stage: Stage) -> TrainConfig:
    """The config a stage's loader reads: its mix and its own data order."""
    return config.model_copy(update={"mix": mix_of(config, stage), "seed": config.seed + 1009 * stage.index})


def objectives_of(config: TrainConfig, stage: Stage) -> LossWeightsConfig:
    if stage.config is not None and stage.config.objectives is not None:
        return stage.config.objectives
    return config.loss_weights


def uses_alignment(config: TrainConfig) -> bool:
    """Whether any stage trains ITC or ITM (the model then carries their heads)."""
    weights = [config.loss_weights] + [stage.objectives for stage in config.stages if stage.objectives]
    return any(weight.itc or weight.itm for weight in weights)
