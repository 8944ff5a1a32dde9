"""Typed configuration for `pipeline.yaml`: every section a pydantic model with `extra="forbid"`,
so a misspelt key fails. Reading files and `--set` overrides, and printing a config back, is
`schemas.loading` (`load_config` turns any validation problem into one `ConfigError` naming the
dotted key).
"""

from __future__ import annotations

import ipaddress
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .quality import QualityConfig
from .sections import Section as _Section


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class SourceConfig(_Section):
    """One input corpus."""

    name: str = Field(min_length=1, description="unique name; part of every row id")
    kind: Literal["paired", "image", "text"]
    path: str = Field(
        min_length=1,
        description=".jsonl/.parquet/.csv/.tsv (optionally .gz), .txt (one text per line, kind: text), a glob of "
        "those, or an image folder (kind: image)",
    )
    url_column: str = "url"
    image_column: Optional[str] = Field(
        None, description="a column holding the image itself instead of a url: bytes, or a struct with `bytes` "
        "(and `path`) as Hugging Face datasets and img2dataset write it; base64 text in JSONL/CSV. Nothing is "
        "downloaded")
    caption_column: str = "caption"
    text_column: str = "text"
    label_column: Optional[str] = Field(None, description="optional class label column, copied to `label`")
    base_url: Optional[str] = Field(
        None, description="joined with relative urls; null = relative to the source file's folder"
    )
    sidecar_captions: bool = Field(
        False, description="image folders: the caption of NAME.jpg is NAME.txt beside it (kind: paired)")
    label_from_folder: bool = Field(
        False, description="image folders: an image's label is the name of the folder it is in (cats/x.jpg -> cats)")
    allow_local_files: bool = Field(
        False, description="let the url column name any local file (absolute paths, file://, ../ out of the "
        "source file's folder); off: http(s) and paths inside the source file's own folder only")
    allow_object_stores: bool = Field(
        False, description="let the url column name object-store URLs (s3://, gs://, az://, hdfs://...), read "
        "with this machine's credentials")
    quoting: Optional[Literal["standard", "none"]] = Field(
        None, description="CSV/TSV quotes: standard = a field may be quoted (\"a, b\"), closed on the same line; "
        "none = a quote is a character like any other (TSV from the web). null = standard for .csv, none for .tsv. "
        "Every line is one row: a quote left open is that line's bad_row, never a merge with the next lines")

    id_from: Literal["line", "url", "url_path", "column"] = Field(
        "line", description="what a row's id is made from (with the source name): line = its file and line (or "
        "row) number; url = its image url; url_path = the url less scheme, host and port, as the row gives it "
        "(relative urls before base_url: a mirror or another port is the same dataset); column = the id_column value. Rows with the same url or key get the same id")
    id_column: Optional[str] = Field(None, description="with id_from: column, the column holding each row's key")

    @model_validator(mode="after")
    def _id_source(self) -> "SourceConfig":
        if self.id_from == "column" and not self.id_column:
            raise ValueError("id_from: column needs id_column (the column that holds each row's key)")
        if self.id_from in ("url", "url_path") and (self.kind == "text" or self.image_column):
            raise ValueError(f"id_from: {self.id_from} needs an image url column (a {self.kind} source"
                             f"{' with image_column' if self.image_column else ''} has none); use line or column")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if any(ch in value for ch in "/\\\n\t"):
            raise ValueError("source names may not contain slashes or whitespace control characters")
        return value


class DownloadConfig(_Section):
    timeout_s: float = Field(10.0, gt=0, description="whole-request deadline (connect + all bytes)")
    retries: int = Field(1, ge=0, description="extra attempts after a timeout/connection error/5xx")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each attempt")
    threads: int = Field(
        128, ge=1, le=1024,
        description="requests in flight per worker process; each result is used as it completes, so a hanging "
        "URL holds one slot for at most timeout_s")
    max_per_host: Optional[int] = Field(
        None, ge=1, description="requests in flight to one host per worker (hosts that rate-limit ban crawlers "
        "that hammer them); null = no cap")
    dns_cache_s: float = Field(300.0, ge=0, description="seconds a host's resolved addresses are reused; 0 = off")
    max_bytes: int = Field(20_000_000, gt=0, description="larger bodies are rejected as too_large")
    max_redirects: int = Field(5, ge=0)
    allow_private_addresses: bool = Field(
        False, description="allow private, loopback and link-local targets (off: refused, also on redirects)"
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs exempt from the private-address guard (e.g. an internal mirror)",
    )
    user_agent_token: Optional[str] = Field("mmae", description="token matched in X-Robots-Tag directives")
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out (as img2dataset)",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)
        return value


class ImageConfig(_Section):
    size: int = Field(64, ge=8, le=4096, description="output side in pixels")
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = "center_crop"
    min_size: int = Field(16, ge=1, description="shorter original side below this is too_small")
    max_aspect_ratio: float = Field(3.0, ge=1.0)
    max_pixels: int = Field(
        80_000_000, gt=0, description="original width*height cap, checked from the header before decoding"
    )
    max_decode_mb: int = Field(
        1024, ge=16, description="decoded pixels held at once by one worker process's decoding threads; an "
        "image waits until it fits, and one that alone needs more is rejected (too_many_pixels)")
    format: Literal["jpeg", "webp", "png"] = "jpeg"
    quality: int = Field(90, ge=1, le=100)


class TextConfig(_Section):
    min_words: int = Field(1, ge=0)
    max_chars: int = Field(2000, ge=1, description="cleaned text is cut to this many characters")
    max_tokens: int = Field(64, ge=1, description="stored tokens are cut to this length")


class TokenizerConfig(_Section):
    model: Optional[str] = Field(
        None, description="a SentencePiece .model, or a built dataset folder whose tokenizer to reuse (datasets "
        "trained on together must share one); null = train one on the corpus")
    vocab_size: int = Field(4000, ge=16, description="upper bound; small corpora get fewer pieces")
    model_type: Literal["unigram", "bpe"] = Field(
        "bpe", description="bpe: whole-word pieces even on small corpora (unigram can stall at a few dozen)"
    )
    sample_size: int = Field(
        200_000, ge=10, description="texts sampled (deterministically, by id hash) to train on"
    )


class ShardsConfig(_Section):
    rows_per_shard: int = Field(5000, ge=1)
    rows_per_row_group: int = Field(256, ge=1, description="the streaming unit of the trainer")


class DataConfig(_Section):
    output: str = Field("build/demo/shards", description="local path or fsspec URL")
    sources: list[SourceConfig] = Field(min_length=1)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    progress_every_s: float = Field(10.0, gt=0, description="seconds between progress log lines")
    chunk_rows: int = Field(
        500, ge=1, description="input rows per work unit: one worker downloads a chunk and commits it to "
        "OUT/staging; an interrupted build resumes from the committed chunks")
    max_row_bytes: Optional[int] = Field(
        None, ge=1024, description="a JSONL/CSV/TSV line longer than this is rejected (row_too_long) without "
        "being held in memory; null = max(1 MiB, 32 x text.max_chars), plus the base64 of download.max_bytes "
        "for a source with image_column")
    keep_staging: bool = Field(
        True, description="keep OUT/staging (a second copy of the images) after a finished build, so "
        "`mmae build --retry-transient` can retry timeouts/5xx/429 later; false deletes it on success")

    @model_validator(mode="after")
    def _unique_source_names(self) -> "DataConfig":
        names = [source.name for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicates)}")
        return self


class MixConfig(_Section):
    """Share of each kind in *every* batch (normalised; 0 = never read)."""

    paired: float = Field(0.5, ge=0)
    image: float = Field(0.25, ge=0)
    text: float = Field(0.25, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> "MixConfig":
        if self.paired + self.image + self.text <= 0:
            raise ValueError("at least one of paired/image/text must have a positive share")
        return self

    def shares(self) -> dict[str, float]:
        total = self.paired + self.image + self.text
        return {kind: getattr(self, kind) / total for kind in ("paired", "image", "text")}


# The patch side of each model preset (trainer.model.PRESETS, checked against it by a test).
PATCH_SIZES = {"tiny": 8, "mini": 8, "small": 16, "base": 16, "large": 16}


class ModelConfig(_Section):
    preset: Literal["tiny", "mini", "small", "base", "large"] = Field(
        "tiny", description="tiny and mini run on a laptop CPU (mini: twice as wide and deep, ~4x the compute)")
    patch_size: Optional[int] = Field(
        None, ge=2, le=64, description="pixels per patch side; null = the preset's (8 for tiny and mini, 16 for the "
        "others). Halving it at a fixed image size gives 4x the tokens (and about 4x the compute)")
    norm_pix_loss: bool = Field(True, description="MSE on per-patch normalised pixels (MAE's best setting)")


class MaskingConfig(_Section):
    strategy: Literal["independent", "cross"] = Field(
        "independent", description="cross (MaskVLM): a paired sample masks one modality, the other stays visible")
    image_ratio: float = Field(0.75, ge=0, lt=1)
    text_ratio: float = Field(0.75, ge=0, le=1, description="M3AE: 0.5-0.9 beats BERT's 0.15")


class LossWeightsConfig(_Section):
    image: float = Field(1.0, ge=0)
    text: float = Field(1.0, ge=0, description="masked-token loss of paired captions")
    unpaired_text: float = Field(1.0, ge=0, description="masked-token loss of text-only samples")
    itc: float = Field(0.0, ge=0, description="image-text contrastive loss on paired samples (0 = off)")
    itm: float = Field(0.0, ge=0, description="image-text matching loss with hard negatives (0 = off)")


class StageConfig(_Section):
    """One stage of a curriculum (MoMo, VLMo): its length, data mix, objectives, frozen modules."""

    name: Optional[str] = None
    steps: int = Field(ge=1)
    mix: MixConfig = Field(default_factory=MixConfig)
    objectives: Optional[LossWeightsConfig] = Field(None, description="loss weights; null = train.loss_weights")
    frozen: list[str] = Field(default_factory=list, description="parameter-name prefixes not trained in this stage")


class OptimizerConfig(_Section):
    base_lr: float = Field(
        1.5e-3, gt=0, description="lr = base_lr * global batch / 256 (MAE's rule). The one default every recipe "
        "uses: at the demo's batch sizes and run lengths 1.5e-4 (MAE's 800-epoch value) barely moves the loss")
    lr: Optional[float] = Field(None, gt=0, description="set to bypass the batch scaling")
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0, description="none on norms, biases, embeddings, special tokens")
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max global grad norm; null = off")


class ValidationConfig(_Section):
    """Validation loss on data the run never trains on, every `every` steps."""

    data: Optional[str] = Field(
        None, description="a built dataset to validate on (e.g. built from the corpus's own validation split)")
    holdout: float = Field(
        0.0, ge=0, lt=0.5, description="or: this fraction of train.data's rows (by id hash) is held out of training "
        "and validated on; reads the id column of every shard once at start")
    every: int = Field(100, ge=1, description="steps between validations (and the last step)")
    batches: int = Field(4, ge=1, description="batches of batch_size samples per validation (the same each time)")

    @property
    def enabled(self) -> bool:
        return self.data is not None or self.holdout > 0


class DatasetEntry(_Section):
    """One built dataset of `train.data`, with its weight in the mix."""

    path: str = Field(min_length=1, description="a built dataset (folder or URL with manifest.json)")
    weight: float = Field(1.0, gt=0, description="each of its rows is drawn `weight` times as often as a row of a "
                          "weight-1 dataset of the same kind (shares follow weight x rows)")
    name: Optional[str] = Field(None, description="prefix of its row ids in this run (default: the shortest tail "
                                "of its path that tells the datasets apart)")

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not value or any(ch in value for ch in ":\n\t")):
            raise ValueError("a dataset name may not be empty or contain ':' or control characters")
        return value


def _dataset_names(paths: list[str]) -> list[str]:
    """The shortest path tails that tell datasets apart: build/a/shards, build/b/shards -> a/shards, b/shards."""
    parts = [[part for part in path.rstrip("/").split("/") if part] or [path] for path in paths]
    for depth in range(1, max(len(part) for part in parts) + 1):
        names = ["/".join(part[-depth:]) for part in parts]
        if len(set(names)) == len(names):
            return names
    return [str(index) for index in range(len(paths))]


class TrainConfig(_Section):
    data: Union[str, list[Union[str, DatasetEntry]]] = Field(
        "build/demo/shards", description="a built dataset (folder or URL with manifest.json), or a list of them "
        "([A, B] or [{path: A, weight: 2.0}, B]) that share one tokenizer (build B with data.tokenizer.model: A)")
    out: str = Field("build/demo/run", description="the run folder")
    seed: int = 0
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1, le=1 << 20, description="samples per batch per rank")
    mix: MixConfig = Field(default_factory=MixConfig)
    source_weights: dict[str, float] = Field(
        default_factory=dict, description="relative weights of sources inside their kind (default: by size)"
    )
    num_workers: int = Field(2, ge=0, le=256, description="DataLoader worker processes per rank")
    prefetch_factor: int = Field(2, ge=1)
    shuffle_window: int = Field(1024, ge=1, le=10_000_000,
                                description="rows permuted together (the bounded shuffle buffer)")
    image_size: int = Field(64, ge=8, le=2048, description="a multiple of the preset's patch size (8 for tiny and mini, 16 "
                            "otherwise)")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop area range")
    max_text_tokens: int = Field(64, ge=1, le=8192)
    data_errors: Literal["fail", "skip"] = Field(
        "fail", description="unreadable data (a shard that cannot be opened, a row group that cannot be read, an "
        "image that does not decode): fail naming it, or skip it, log it and count it in metrics (skipped_samples)"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    loss_weights: LossWeightsConfig = Field(default_factory=LossWeightsConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    attention: Literal["auto", "xformers", "sdpa"] = Field(
        "auto", description="auto: packed rows, attention by xformers when it can run (CUDA), else one torch "
                            "SDPA call; sdpa: SDPA on padded batches (every op padded; the reference)")
    grad_accum: int = Field(1, ge=1, le=4096, description="micro-batches per optimizer step")
    resume_from: Optional[str] = Field(
        None, description="resume from this checkpoint (a file, a `last` pointer or a run folder) instead of the run "
        "folder's newest readable one")
    init_from: Optional[str] = Field(
        None, description="a new run starts from this checkpoint's model weights, with a fresh optimizer, schedule "
        "and data position (continued pretraining on new data); ignored once the run has checkpoints of its own")
    allow_mismatch: bool = Field(
        False, description="let train.init_from start from a checkpoint whose tokenizer is not train.data's "
        "(its token embeddings then stand for other words); off: refused, naming both")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a step whose loss or gradient norm is NaN/inf: stop the run with an error naming the "
        "step (the default), or skip that update (counted in metrics as skipped_steps) up to max_skipped_steps")
    max_skipped_steps: int = Field(10, ge=0, description="with on_nonfinite: skip, the run stops after this many")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    compile: bool = Field(False, description="torch.compile the model (dynamic shapes)")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: DDP (a model replica per process) or FSDP (parameters, "
        "gradients and optimizer state sharded over processes; for the large presets)"
    )
    tensorboard: bool = Field(
        False, description="also write TensorBoard events to RUN/tensorboard: scalars, validation reconstructions, "
        "hyperparameters; one stream across resumes")
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    use_text: bool = Field(
        True, description="false: the image-only MAE baseline on the same data (captions dropped, text skipped)")
    stages: list[StageConfig] = Field(
        default_factory=list, description="a curriculum; when set, steps = the sum of the stages' steps")
    step_mode: Literal["packed", "per_kind"] = Field(
        "packed", description="per_kind: one forward/backward per kind, gradients summed, one optimizer step")

    @property
    def datasets(self) -> list[DatasetEntry]:
        """`data` as entries, each with its name (the prefix of its ids when there are several)."""
        entries = [DatasetEntry(path=item) if isinstance(item, str) else item
                   for item in ([self.data] if isinstance(self.data, str) else self.data)]
        names = _dataset_names([entry.path for entry in entries])
        return [entry if entry.name else entry.model_copy(update={"name": name}) for entry, name in zip(entries, names)]

    @property
    def data_paths(self) -> list[str]:
        return [entry.path for entry in self.datasets]

    @field_validator("data")
    @classmethod
    def _some_data(cls, value):
        if isinstance(value, str):
            if not value:
                raise ValueError("train.data is empty")
            return value
        if not value:
            raise ValueError("train.data lists no dataset")
        paths = [item if isinstance(item, str) else item.path for item in value]
        repeated = sorted({path for path in paths if paths.count(path) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} is listed twice (give it a weight instead)")
        names = [item.name for item in value if not isinstance(item, str) and item.name]
        if len(set(names)) != len(names):
            raise ValueError("two datasets have the same name")
        return value

    @model_validator(mode="after")
    def _steps_from_stages(self) -> "TrainConfig":
        if self.stages:
            total = sum(stage.steps for stage in self.stages)
            if "steps" in self.model_fields_set and self.steps != total:
                lengths = ", ".join(f"train.stages.{index}.steps={stage.steps}" for index, stage in enumerate(self.stages))
                raise ValueError(f"train.steps is {self.steps} but this recipe's stages decide the length: they sum "
                                 f"to {total} ({lengths}); set the stages' steps instead (or drop train.steps)")
            if self.steps != total:
                object.__setattr__(self, "steps", total)
        return self

    @field_validator("source_weights")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        negative = [name for name, weight in value.items() if weight < 0]
        if negative:
            raise ValueError(f"negative weight for {', '.join(negative)}")
        return value

    @model_validator(mode="after")
    def _image_size_fits_patches(self) -> "TrainConfig":
        patch = self.model.patch_size or PATCH_SIZES.get(self.model.preset, 16)
        whose = "train.model.patch_size" if self.model.patch_size else f"the {self.model.preset} preset's"
        if self.image_size % patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {whose} "
                             f"{patch}-pixel patches (try {max(patch, self.image_size // patch * patch)})")
        return self

    @field_validator("crop_scale")
    @classmethod
    def _valid_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("expected 0 < low <= high <= 1")
        return value


class Config(_Section):
    data: Optional[DataConfig] = None
    train: Optional[TrainConfig] = None
