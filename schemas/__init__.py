"""The contract between `mmae build` and the trainer.

Shard schema (Arrow), manifest model and typed configuration. This package imports only
pyarrow, pydantic and PyYAML: never Beam, never torch.
"""

from .config import Config, ConfigError, TrainConfig
from .loading import load_config
from .shard import KINDS, REJECT_SCHEMA, SCHEMA_VERSION, SHARD_SCHEMA

__all__ = [
    "Config",
    "ConfigError",
    "KINDS",
    "REJECT_SCHEMA",
    "SCHEMA_VERSION",
    "SHARD_SCHEMA",
    "TrainConfig",
    "load_config",
]
