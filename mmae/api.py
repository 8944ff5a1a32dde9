"""The Python API: what the `mmae` commands do, from a notebook or a script.

    from mmae import api

    report = api.build("pipeline.yaml")                         # mmae build: the Beam pipeline
    stats = api.stats("build/demo/shards")                      # mmae stats --json, as a dict
    for batch in api.batches("pipeline.yaml", steps=10):        # the training loader: trainer.batch.Batch
        print(batch.counts(), batch.images.shape)
    last = api.train("pipeline.yaml", ["train.steps=200"])      # mmae train, in this process
    model = api.load("build/demo/run")                          # a checkpoint, run folder or exported folder
    images = model.embed_images([PIL.Image.open("cat.jpg")])    # [N, D] float tensor
    texts = model.embed_texts(["a photo of a cat"])             # tokenised with the checkpoint's tokenizer

Each function takes a config path (or None for the defaults) and `--set`-style overrides.
"""

from __future__ import annotations

import io
from typing import Any, Iterator, Optional, Sequence


def _config(config: Optional[str], overrides: Optional[Sequence[str]]):
    from mmae.schemas.loading import load_config

    return load_config(config, list(overrides or []))


# The commands' errors name their flags; from Python the same advice names the parameters.
_PYTHON_WORDS = (("pass --overwrite", "pass overwrite=True"), ("rebuild with --overwrite", "rebuild with overwrite=True"),
                 ("rerun with --overwrite", "rerun with overwrite=True"), ("--retry-transient", "retry_transient=True"),
                 ("--overwrite", "overwrite=True"), ("--append", "append=True"), ("--set ", "overrides: "), ("--allow-mismatch", "allow_mismatch=True"))


def _in_python(error: Exception) -> Exception:
    """The same exception type, its message in the API's words (`overwrite=True`, not `--overwrite`)."""
    message = str(error)
    for flag, parameter in _PYTHON_WORDS:
        message = message.replace(flag, parameter)
    try:
        return type(error)(message)
    except TypeError:  # an exception type that needs other arguments: keep it as it is
        return error


def build(config: Optional[str] = "pipeline.yaml", overrides: Optional[Sequence[str]] = None,
          beam_args: Optional[Sequence[str]] = None, overwrite: bool = False,
          retry_transient: bool = False, append: bool = False) -> dict[str, Any]:
    """Build (or resume building) the dataset of the config's `data:` section; the build report.
    `overwrite`: replace a finished build; `retry_transient`: fetch its transient failures again;
    `append`: add only what is new in the sources to a finished build."""
    from mmae.pipelines.builder.pipeline import BuildError, run
    from mmae.schemas.config import ConfigError

    try:
        return run(_config(config, overrides), list(beam_args or []), overwrite=overwrite,
                   retry_transient=retry_transient, append=append)
    except (BuildError, ConfigError) as error:
        raise _in_python(error) from None


def stats(dataset: str) -> dict[str, Any]:
    """Every figure of `mmae stats --json`."""
    from mmae.pipelines.inspect.dataset import Dataset
    from mmae.pipelines.inspect.stats import compute_stats

    return compute_stats(Dataset.open(dataset))


def batches(config: Optional[str] = "pipeline.yaml", overrides: Optional[Sequence[str]] = None,
            steps: Optional[int] = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
    """Mixed training batches of the config's `train:` section (`steps` of them, or forever)."""
    from mmae.trainer.loader import MixedLoader

    settings = _config(config, overrides).train
    if settings is None:
        raise ValueError("the config has no train: section")
    return MixedLoader(settings, rank=rank, world_size=world_size).batches(steps)


def train(config: Optional[str] = "pipeline.yaml", overrides: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train (or resume) in this process; the last logged metrics. Several processes: torchrun."""
    from mmae.schemas.config import ConfigError
    from mmae.trainer.train import TrainError, run_training

    try:
        return run_training(_config(config, overrides))
    except (ConfigError, TrainError) as error:
        raise _in_python(error) from None


class Model:
    """A trained model, ready to embed images and texts (`load` makes one)."""

    def __init__(self, model, state: dict[str, Any], source: str, tokenizer_path: Optional[str] = None) -> None:
        self.model, self.state, self.source = model, state, source
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None

    @property
    def dim(self) -> int:
        return self.model.size.dim

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from mmae.trainer.embed import checkpoint_tokenizer

            self._tokenizer = checkpoint_tokenizer(self.source, self.state, self._tokenizer_path)
        return self._tokenizer

    def embed_images(self, images: Sequence[Any], pool: str = "cls"):
        """PIL images (or encoded bytes) -> [N, D]: the centre view at the model's size, unmasked."""
        import torch

        from mmae.trainer.transforms import eval_view

        views = []
        for image in images:
            if not isinstance(image, (bytes, bytearray)):
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                image = buffer.getvalue()
            views.append(eval_view(bytes(image), self.model.image_size))
        return self.model.encode_images(torch.stack(views), pool=pool)

    def embed_texts(self, texts: Sequence[str], pool: str = "cls"):
        """Strings -> [N, D], tokenised with the checkpoint's tokenizer."""
        import torch

        rows = [torch.tensor(self.tokenizer.encode(text), dtype=torch.long) for text in texts]
        return self.model.encode_texts(rows, pool=pool)


def load(checkpoint: str, tokenizer: Optional[str] = None) -> Model:
    """A checkpoint file, a `last` pointer, a run folder or a `mmae export --format safetensors` folder."""
    from mmae.trainer.load import load_model

    model, state = load_model(checkpoint)
    return Model(model, state, str(checkpoint), tokenizer)
