"""The unified multimodal masked autoencoder (M3AE recipe).

One pre-LN transformer encoder sees `[CLS | kept image patches | kept text tokens]` of every
sample (image-only and text-only samples simply lack one part); a light decoder sees the
encoded tokens plus learned per-modality mask tokens at the masked positions, and predicts
the pixels of masked patches (MSE, optionally on per-patch normalised targets) and the ids of
masked text tokens (cross-entropy). Positions are fixed sin-cos (2D for patches, 1D for
text); modality-type embeddings are learned.

Samples are handled as *packed rows*: every tensor of tokens is `[T, D]` with per-sample
lengths, so no FLOP is spent on padding unless the attention backend asks for it.

    model = build_model("tiny", vocab_size=340, image_size=64, max_text_tokens=64)
    layout = model.layout(batch.inputs(), config.masking, seed)  # trainer.layout (the loader makes these)
    losses = model(batch.inputs(), layout, weights)       # forward_loss: Losses (trainer.objectives)
    predictions = model.predict(batch.inputs(), layout)   # Predictions at the masked positions
    features = model.encode_images(images)                # [N, D] CLS features, nothing masked

The model only computes: which rows go where comes from a `Layout` (trainer.layout; masks from
trainer.masking), built in the loader's workers, so the model's forward has no loop over samples
and reads no device value back. Loss functions and every collective they need are in
`trainer.objectives`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn as nn
from .attention import Arrangement, attend, from_layout, to_layout
from .batch import Inputs
from .layout import CLS, IMAGE, TEXT, Alignment, Layout, Sequences, unmasked_layout
from .masking import Ratios
from .step_inputs import layout_for
from mmae.schemas.config import LossWeightsConfig, MaskingConfig
from .objectives import Losses, Weights, alignment_losses, masked_losses

LN_EPS = 1e-6  # MAE's (and timm's ViT) LayerNorm epsilon: exported encoders compute the same features


@dataclass(frozen=True)
class ModelSize:
    dim: int
    depth: int
    heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    patch_size: int
    mlp_ratio: float = 4.0


PRESETS = {
    # Runs a real step in well under a second on 2 CPU cores; tests and the demo use it.
    "tiny": ModelSize(dim=64, depth=2, heads=4, decoder_dim=64, decoder_depth=1, decoder_heads=4, patch_size=8),
    # Four times tiny's compute per token: the largest that trains a study's runs in minutes on a CPU.
    "mini": ModelSize(dim=128, depth=4, heads=4, decoder_dim=128, decoder_depth=1, decoder_heads=4, patch_size=8),
    "small": ModelSize(dim=384, depth=12, heads=6, decoder_dim=512, decoder_depth=8, decoder_heads=16, patch_size=16),
    "base": ModelSize(dim=768, depth=12, heads=12, decoder_dim=512, decoder_depth=8, decoder_heads=16, patch_size=16),
    "large": ModelSize(dim=1024, depth=24, heads=16, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                       patch_size=16),
}


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim] fixed sin-cos embedding (MAE's formula)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim]: half the channels encode the row, half the column."""
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, arrangement: Arrangement) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).unbind(2)  # [N, L, H, Dh]
        return self.proj(attend(q, k, v, arrangement).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-LN transformer block; works on either layout."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, arrangement: Arrangement) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), arrangement)
        return x + self.mlp(self.norm2(x))


@dataclass
class Predictions:
    """What the decoder predicts at the masked positions of one forward, with the true values."""

    pixels: torch.Tensor  # [M, p*p*3] predicted masked patches
    pixel_targets: torch.Tensor  # [M, p*p*3] their true pixels (normalised images, not per patch)
    pixel_at: torch.Tensor  # [M, 2] (image row, patch) of each
    token_logits: torch.Tensor  # [K, vocab] predicted masked tokens
    token_targets: torch.Tensor  # [K] their true ids
    token_at: torch.Tensor  # [K] index of each in the packed `Inputs.tokens`
    token_paired: torch.Tensor  # [K] bool: a caption token of a sample with an image (paired first)
    counts: dict[str, int]  # host: masked patches / paired / unpaired text tokens (the layout's)
    encoder_tokens: int
    decoder_tokens: int
    anchor: torch.Tensor  # a zero connected to the graph: a loss with no targets still back-propagates


class MultimodalMAE(nn.Module):
    def __init__(self, size: ModelSize, vocab_size: int, image_size: int, max_text_tokens: int = 256,
                 norm_pix_loss: bool = True, alignment: bool = False) -> None:
        super().__init__()
        if image_size % size.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch size {size.patch_size}")
        self.size, self.vocab_size, self.image_size = size, vocab_size, image_size
        self.patch_size = size.patch_size
        self.grid = image_size // size.patch_size
        self.num_patches = self.grid * self.grid
        self.max_text_tokens = max_text_tokens
        self.norm_pix_loss = norm_pix_loss
        dim, decoder_dim = size.dim, size.decoder_dim
        patch_dim = 3 * self.patch_size**2

        self.patch_embed = nn.Linear(patch_dim, dim)
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(dim))
        self.type_embed = nn.Embedding(3, dim)
        self.register_buffer("image_pos", sincos_2d(dim, self.grid), persistent=False)
        self.register_buffer("text_pos", sincos_1d(dim, torch.arange(max_text_tokens)), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, size.heads, size.mlp_ratio) for _ in range(size.depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.image_mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.text_mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder_type_embed = nn.Embedding(3, decoder_dim)
        self.register_buffer("decoder_image_pos", sincos_2d(decoder_dim, self.grid), persistent=False)
        self.register_buffer("decoder_text_pos", sincos_1d(decoder_dim, torch.arange(max_text_tokens)),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, size.decoder_heads, size.mlp_ratio) for _ in range(size.decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=LN_EPS)
        self.image_head = nn.Linear(decoder_dim, patch_dim)
        self.text_head = nn.Linear(decoder_dim, vocab_size)
        self.alignment = alignment
        if alignment:  # MaskVLM's ITC (projections + learnable temperature) and ITM head
            projection = min(256, dim)
            self.itc_image_proj = nn.Linear(dim, projection)
            self.itc_text_proj = nn.Linear(dim, projection)
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # 1-D: FSDP shards no scalars
            self.itm_head = nn.Linear(dim, 2)
        self._init_weights()
        self.layout_kind, self.backend = "padded", "sdpa"

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for parameter in (self.cls_token, self.image_mask_token, self.text_mask_token):
            nn.init.normal_(parameter, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.type_embed.weight, std=0.02)
        nn.init.normal_(self.decoder_type_embed.weight, std=0.02)

    def set_attention(self, backend: str, layout: str) -> None:
        self.backend, self.layout_kind = backend, layout

    # -- shapes -------------------------------------------------------------------------

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, P, p*p*3]"""
        n, p, g = images.shape[0], self.patch_size, self.grid
        x = images.reshape(n, 3, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, g * g, p * p * 3)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, P, p*p*3] -> [N, 3, S, S]"""
        n, p, g = patches.shape[0], self.patch_size, self.grid
        x = patches.reshape(n, g, g, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, 3, g * p, g * p)

    # -- forward ------------------------------------------------------------------------

    def _run(self, blocks, norm, x: torch.Tensor, sequences: Sequences) -> torch.Tensor:
        hidden, arrangement = to_layout(x, sequences, self.layout_kind, self.backend)
        for block in blocks:
            hidden = block(hidden, arrangement)
        return norm(from_layout(hidden, arrangement))

    def encode(self, inputs: Inputs, layout: Layout, patches: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed everything, keep what the layout shows, run the encoder on packed rows
        `[CLS | kept patches | kept tokens]` -> [T_enc, D]. `patches`: the images patchified, when
        the caller has them."""
        patches = self.patchify(inputs.images) if patches is None else patches  # [N_img, P, p*p*3]
        image_tokens = self.patch_embed(patches) + self.image_pos + self.type_embed.weight[IMAGE]  # [N_img, P, D]
        text_tokens = (self.token_embed(inputs.tokens) + self.text_pos[layout.text_positions]
                       + self.type_embed.weight[TEXT])  # [T_tok, D]
        cls = (self.cls_token + self.type_embed.weight[CLS]).unsqueeze(0)  # [1, D]
        pool = torch.cat([cls, image_tokens.reshape(-1, image_tokens.shape[-1]), text_tokens])
        return self._run(self.blocks, self.norm, pool[layout.encoder_index], layout.encoder)  # [T_enc, D]

    def predict(self, inputs: Inputs, layout: Layout) -> Predictions:
        """Encode what the layout shows; decode rows of CLS, every patch and every token (encoded
        where kept, a mask token where not); predict pixels and ids at the masked positions."""
        patches = self.patchify(inputs.images)  # [N_img, P, p*p*3]: the encoder's input and the targets
        encoded = self.encode(inputs, layout, patches)
        projected = self.decoder_embed(encoded)  # [T_enc, Dd]
        pool = torch.cat([projected, self.image_mask_token[None], self.text_mask_token[None]])
        types = self.decoder_type_embed.weight  # folded into the position table: one gather, not two
        positions = torch.cat([types[CLS:CLS + 1], self.decoder_image_pos + types[IMAGE],
                               self.decoder_text_pos + types[TEXT]])  # [1 + P + max_text, Dd]
        x = pool[layout.decoder_index] + positions[layout.decoder_positions]  # [T_dec, Dd]
        decoded = self._run(self.decoder_blocks, self.decoder_norm, x, layout.decoder)  # [T_dec, Dd]
        pixels = self.image_head(decoded[layout.pixel_rows])  # [M, p*p*3]
        pixel_targets = patches[layout.pixel_at[:, 0], layout.pixel_at[:, 1]]
        token_logits = self.text_head(decoded[layout.token_rows])  # [K, vocab]
        return Predictions(pixels, pixel_targets, layout.pixel_at, token_logits, inputs.tokens[layout.token_at],
                           layout.token_at, layout.token_paired, layout.counts(), layout.encoder_tokens,
                           layout.decoder_tokens, anchor=decoded.sum() * 0.0)

    def layout(self, inputs: Inputs, masking: Optional[Ratios] = None, seed: int = 0) -> Layout:
        """The layout of `inputs` under `masking` (default M3AE's 75%/75%) drawn from `seed`, built
        here on the host: for evaluation and tests (training gets layouts from the loader)."""
        return layout_for(inputs, self.num_patches, masking or MaskingConfig(), seed).to(self.cls_token.device)

    def forward_loss(self, inputs: Inputs, layout: Optional[Layout] = None, weights: Optional[Weights] = None,
                     normalisers: Optional[dict[str, float]] = None, seed: int = 0,
                     alignment: Optional[Alignment] = None) -> Losses:
        """The training forward: predictions at the masked positions and the weighted loss.

        `layout` defaults to M3AE's 75%/75% masks drawn from `seed`; `normalisers` are the global
        counts of masked patches / paired / unpaired text tokens of the step (all micro-batches,
        all ranks), by default this batch's own, i.e. plain means. `alignment` (the paired samples,
        from the loader) is built here when ITC/ITM need it and none is given."""
        weights = weights or LossWeightsConfig()
        layout = layout if layout is not None else self.layout(inputs, seed=seed)
        losses = masked_losses(self.predict(inputs, layout), weights, self.norm_pix_loss, normalisers)
        if self.alignment and (weights.itc or weights.itm):
            if alignment is None:
                alignment = Alignment.of(inputs.image_index.cpu(), inputs.token_lengths.cpu(), self.num_patches)
                alignment = alignment.to(self.cls_token.device) if alignment is not None else None
            losses.itc_loss, losses.itm_loss = alignment_losses(self, inputs, alignment, seed)
            losses.loss = losses.loss + weights.itc * losses.itc_loss + weights.itm * losses.itm_loss
        return losses

    forward = forward_loss  # what DDP/FSDP wrappers call: every parameter's use happens inside it

    # -- features -----------------------------------------------------------------------

    def cls_features(self, inputs: Inputs, layout: Optional[Layout] = None) -> torch.Tensor:
        """Unmasked forward of whatever each sample holds -> its CLS [B, D] (with gradients);
        `layout`: the unmasked layout of `inputs` when the caller has it."""
        if layout is None:
            layout = unmasked_layout(inputs.image_index.cpu(), inputs.token_lengths.cpu(), self.num_patches)
            layout = layout.to(self.cls_token.device)
        return self.encode(inputs, layout)[layout.cls_rows]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """Unmasked image-only forward -> [N, D] features: the CLS token, or the mean of the patches."""
        tokens = self.patch_embed(self.patchify(images)) + self.image_pos + self.type_embed.weight[IMAGE]
        cls = (self.cls_token + self.type_embed.weight[CLS]).expand(len(images), 1, -1)
        x = torch.cat([cls, tokens], dim=1)  # [N, 1+P, D]: equal lengths, no padding needed
        sequences = Sequences.of(torch.full((len(images),), x.shape[1])).to(x.device)
        encoded = self._run(self.blocks, self.norm, x.reshape(-1, x.shape[-1]), sequences)
        encoded = encoded.view(len(images), -1, encoded.shape[-1])
        return encoded[:, 0] if pool == "cls" else encoded[:, 1:].mean(dim=1)

    @torch.no_grad()
    def encode_texts(self, rows: list[torch.Tensor], pool: str = "cls") -> torch.Tensor:
        """Unmasked text-only forward of token rows -> [N, D]: the CLS token, or the mean of the tokens."""
        rows = [row[: self.max_text_tokens] for row in rows]
        inputs = Inputs.of_texts(rows)
        layout = unmasked_layout(inputs.image_index, inputs.token_lengths, self.num_patches)
        encoded = self.encode(inputs.to(self.cls_token.device), layout.to(self.cls_token.device))
        pieces = torch.split(encoded, layout.encoder.seqlens)
        if pool == "cls":
            return torch.stack([piece[0] for piece in pieces])
        return torch.stack([piece[1:].mean(dim=0) if len(piece) > 1 else piece[0] for piece in pieces])


def build_model(preset: str, vocab_size: int, image_size: int, max_text_tokens: int,
                norm_pix_loss: bool = True, alignment: bool = False, patch_size: Optional[int] = None) -> MultimodalMAE:
    """`patch_size`: another patch side than the preset's (None: the preset's)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (choose from {', '.join(PRESETS)})")
    size = PRESETS[preset] if patch_size is None else replace(PRESETS[preset], patch_size=patch_size)
    return MultimodalMAE(size, vocab_size, image_size, max_text_tokens, norm_pix_loss, alignment)


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint records to rebuild its model: the one way a model is built from a run's
    config, a checkpoint or an exported folder."""

    preset: str
    vocab_size: int
    image_size: int
    max_text_tokens: int
    norm_pix_loss: bool = True
    alignment: bool = False  # ITC/ITM heads
    patch_size: Optional[int] = None  # train.model.patch_size; None: the preset's

    REQUIRED = {"preset": str, "vocab_size": int, "image_size": int, "max_text_tokens": int}

    @classmethod
    def of(cls, config, vocab_size: int, alignment: bool) -> "ModelSpec":
        """The model a TrainConfig trains (a vocabulary of at least 8 ids: image-only runs too)."""
        return cls(config.model.preset, max(vocab_size, 8), config.image_size, config.max_text_tokens,
                   config.model.norm_pix_loss, alignment, _other_patch(config.model.preset, config.model.patch_size))

    @classmethod
    def from_dict(cls, spec: Any) -> "ModelSpec":
        """From a checkpoint's `model_spec`; ValueError naming what is missing or of the wrong type."""
        if not isinstance(spec, dict) or any(not isinstance(spec.get(key), kind) or isinstance(spec.get(key), bool)
                                             for key, kind in cls.REQUIRED.items()):
            raise ValueError(f"the model spec is missing or incomplete (needs {', '.join(cls.REQUIRED)}); got "
                             f"{str(spec)[:200]}")
        patch = spec.get("patch_size")
        if patch is not None and (not isinstance(patch, int) or isinstance(patch, bool) or patch < 1):
            raise ValueError(f"the model spec's patch_size must be a positive integer, not {patch!r}")
        return cls(spec["preset"], spec["vocab_size"], spec["image_size"], spec["max_text_tokens"],
                   bool(spec.get("norm_pix_loss", True)), bool(spec.get("alignment", False)),
                   _other_patch(spec["preset"], patch))

    def to_dict(self) -> dict[str, Any]:
        """As checkpoints record it (`alignment` and `patch_size` only when set, so the specs of
        checkpoints saved before they existed compare equal)."""
        spec = {"preset": self.preset, "vocab_size": self.vocab_size, "image_size": self.image_size,
                "max_text_tokens": self.max_text_tokens, "norm_pix_loss": self.norm_pix_loss}
        if self.alignment:
            spec["alignment"] = True
        if self.patch_size is not None:
            spec["patch_size"] = self.patch_size
        return spec

    def build(self) -> MultimodalMAE:
        return build_model(self.preset, self.vocab_size, self.image_size, self.max_text_tokens, self.norm_pix_loss,
                           self.alignment, self.patch_size)


def _other_patch(preset: str, patch_size: Optional[int]) -> Optional[int]:
    """None when `patch_size` is the preset's own: `patch_size: 8` on mini builds the model a run
    without the setting built, so their specs (and resumes between them) must agree."""
    own = PRESETS[preset].patch_size if preset in PRESETS else None
    return None if patch_size == own else patch_size


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


