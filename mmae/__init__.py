"""mmae: multimodal masked autoencoder pretraining toolkit (command-line entry point)."""

__version__ = "0.1.0"
