"""Training side: the data plan and streaming loader (`data_plan`, `streams`, `loader`),
transforms, model and attention backends, the loop (`train`, also `python -m mmae.trainer`
for torchrun) with its step (`step`, `step_stats`), checkpoints and the one model loader
(`checkpoint`, `load`), evaluation, embedding and export.

Imports torch, xformers (optional, CUDA only), pyarrow and fsspec; never apache_beam.
"""
