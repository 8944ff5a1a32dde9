"""The streaming loader, model and training loop (`mmae train`, `mmae eval`).

Imports torch, xformers (optional), pyarrow and fsspec; never apache_beam. The loader and model
land with the trainer issues; the shard format they read is defined in `schemas/`.
"""
