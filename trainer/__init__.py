"""Training side: streaming loader (`data`), transforms, model and attention backends,
training loop (`train`, also `python -m mmae.trainer` for torchrun), checkpoints and evaluation.

Imports torch, xformers (optional, CUDA only), pyarrow and fsspec; never apache_beam.
"""
