"""The unified multimodal masked autoencoder (M3AE recipe).

One pre-LN transformer encoder sees `[CLS | kept image patches | kept text tokens]` of every
sample (image-only and text-only samples simply lack one part); a light decoder sees the
encoded tokens plus learned per-modality mask tokens at the masked positions, and predicts
the pixels of masked patches (MSE, optionally on per-patch normalised targets) and the ids of
masked text tokens (cross-entropy). Positions are fixed sin-cos (2D for patches, 1D for
text); modality-type embeddings are learned.

Samples are handled as *packed rows*: every tensor of tokens is `[T, D]` with per-sample
lengths, so no FLOP is spent on padding unless the attention backend asks for it.

    model = mmae_tiny(vocab_size=340, image_size=64)
    out = model(batch_inputs, image_ratio=0.75, text_ratio=0.75, generator_seed=...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.attention import Layout, attend, from_layout, to_layout

CLS, IMAGE, TEXT = 0, 1, 2  # modality-type ids


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

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).unbind(2)  # [N, L, H, Dh]
        return self.proj(attend(q, k, v, layout).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-LN transformer block; works on either layout."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), layout)
        return x + self.mlp(self.norm2(x))


@dataclass
class Inputs:
    """What the model needs of a batch (see trainer.data.Batch)."""

    images: torch.Tensor  # [N_img, 3, S, S]
    image_index: torch.Tensor  # [B] row in images or -1
    tokens: torch.Tensor  # [T_tok] packed
    token_lengths: torch.Tensor  # [B]
    ids: list[str]  # per-sample keys for the masking RNG


@dataclass
class Output:
    loss: torch.Tensor
    image_loss: torch.Tensor
    text_loss: torch.Tensor
    unpaired_text_loss: torch.Tensor
    counts: dict[str, int]  # masked patches / text tokens that carried a loss
    encoder_tokens: int
    decoder_tokens: int
    itc_loss: Optional[torch.Tensor] = None
    itm_loss: Optional[torch.Tensor] = None


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
        self.norm = nn.LayerNorm(dim)

        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.image_mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.text_mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder_type_embed = nn.Embedding(3, decoder_dim)
        self.register_buffer("decoder_image_pos", sincos_2d(decoder_dim, self.grid), persistent=False)
        self.register_buffer("decoder_text_pos", sincos_1d(decoder_dim, torch.arange(max_text_tokens)),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, size.decoder_heads, size.mlp_ratio) for _ in range(size.decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
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

    # -- masking ------------------------------------------------------------------------

    def random_masking(self, inputs: Inputs, image_ratio: float, text_ratio: float, seed: int,
                       image_ratios: Optional[list[float]] = None, text_ratios: Optional[list[float]] = None):
        """Per sample: a random permutation of its patches and tokens, from a generator seeded by
        (seed, sample id), so masks do not depend on where a sample sits in a batch or rank.
        Returns, per sample, (kept patch ids, masked patch ids, kept token ids, masked token ids)."""
        plans = []
        lengths = inputs.token_lengths.tolist()
        for index, sample_id in enumerate(inputs.ids):
            generator = torch.Generator().manual_seed(_sample_seed(seed, sample_id))
            has_image = int(inputs.image_index[index]) >= 0
            ratio_i = image_ratios[index] if image_ratios is not None else image_ratio
            ratio_t = text_ratios[index] if text_ratios is not None else text_ratio
            if has_image:
                order = torch.randperm(self.num_patches, generator=generator)
                keep = self.num_patches - int(round(self.num_patches * ratio_i))
                image_keep, image_masked = order[:keep].sort().values, order[keep:].sort().values
            else:
                image_keep = image_masked = torch.empty(0, dtype=torch.long)
            length = lengths[index]
            if length:
                order = torch.randperm(length, generator=generator)
                masked = min(length, max(1 if ratio_t > 0 else 0, int(round(length * ratio_t))))
                text_keep, text_masked = order[masked:].sort().values, order[:masked].sort().values
            else:
                text_keep = text_masked = torch.empty(0, dtype=torch.long)
            plans.append((image_keep, image_masked, text_keep, text_masked))
        return plans

    # -- forward ------------------------------------------------------------------------

    def _run(self, blocks, norm, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        hidden, layout = to_layout(x, seqlens, self.layout_kind, self.backend)
        for block in blocks:
            hidden = block(hidden, layout)
        return norm(from_layout(hidden, layout))

    def forward_encoder(self, inputs: Inputs, plans) -> tuple[torch.Tensor, list[int], dict]:
        """Embed everything, keep the unmasked tokens, run the encoder on packed rows."""
        device = self.cls_token.device
        patches = self.patchify(inputs.images)  # [N_img, P, p*p*3]
        image_tokens = self.patch_embed(patches) + self.image_pos + self.type_embed.weight[IMAGE]  # [N_img, P, D]
        lengths = inputs.token_lengths.tolist()
        positions = torch.cat([torch.arange(length) for length in lengths]) if lengths else torch.empty(0)
        text_tokens = (self.token_embed(inputs.tokens) + self.text_pos[positions.to(device).long()]
                       + self.type_embed.weight[TEXT])  # [T_tok, D]
        cls = (self.cls_token + self.type_embed.weight[CLS]).unsqueeze(0)  # [1, D]
        pool = torch.cat([cls, image_tokens.reshape(-1, image_tokens.shape[-1]), text_tokens])
        image_base, text_base = 1, 1 + image_tokens.shape[0] * self.num_patches
        index, seqlens = [], []
        text_offset = 0
        for sample, (image_keep, _, text_keep, _) in enumerate(plans):
            parts = [torch.zeros(1, dtype=torch.long)]
            row = int(inputs.image_index[sample])
            if row >= 0:
                parts.append(image_base + row * self.num_patches + image_keep)
            parts.append(text_base + text_offset + text_keep)
            text_offset += lengths[sample]
            sample_index = torch.cat(parts)
            index.append(sample_index)
            seqlens.append(len(sample_index))
        flat = torch.cat(index).to(device)
        encoded = self._run(self.blocks, self.norm, pool[flat], seqlens)  # [T_enc, D]
        return encoded, seqlens, {"pool_index": flat}

    def forward_decoder(self, encoded: torch.Tensor, seqlens: list[int], inputs: Inputs, plans):
        """Decoder rows: CLS, every patch, every token (encoded where kept, a mask token where not)."""
        device = encoded.device
        projected = self.decoder_embed(encoded)  # [T_enc, Dd]
        pool = torch.cat([projected, self.image_mask_token[None], self.text_mask_token[None]])
        image_mask_at, text_mask_at = len(projected), len(projected) + 1
        gather, pos_rows, types, seqlens_dec = [], [], [], []
        image_targets, text_targets = [], []  # (decoder row, target) per masked element
        start = 0
        lengths = inputs.token_lengths.tolist()
        decoder_row = 0
        text_offset = 0
        for sample, (image_keep, image_masked, text_keep, text_masked) in enumerate(plans):
            has_image = int(inputs.image_index[sample]) >= 0
            length = lengths[sample]
            rows = [start]  # CLS
            kinds = [CLS]
            positions = [0]
            cursor = start + 1
            if has_image:
                source = torch.full((self.num_patches,), image_mask_at, dtype=torch.long)
                source[image_keep] = torch.arange(cursor, cursor + len(image_keep))
                cursor += len(image_keep)
                rows += source.tolist()
                kinds += [IMAGE] * self.num_patches
                positions += list(range(self.num_patches))
                for patch in image_masked.tolist():
                    image_targets.append((decoder_row + 1 + patch, int(inputs.image_index[sample]), patch, sample))
            if length:
                source = torch.full((length,), text_mask_at, dtype=torch.long)
                source[text_keep] = torch.arange(cursor, cursor + len(text_keep))
                base = decoder_row + 1 + (self.num_patches if has_image else 0)
                rows += source.tolist()
                kinds += [TEXT] * length
                positions += list(range(length))
                for token in text_masked.tolist():
                    text_targets.append((base + token, text_offset + token, sample, has_image))
            text_offset += length
            start += seqlens[sample]
            gather += rows
            types += kinds
            pos_rows += positions
            seqlens_dec.append(len(rows))
            decoder_row += len(rows)
        types_t = torch.tensor(types, device=device)
        pos_t = torch.tensor(pos_rows, device=device)
        position = torch.zeros(len(types), pool.shape[-1], device=device)
        image_rows = types_t == IMAGE
        text_rows = types_t == TEXT
        position[image_rows] = self.decoder_image_pos[pos_t[image_rows]]
        position[text_rows] = self.decoder_text_pos[pos_t[text_rows]]
        x = pool[torch.tensor(gather, device=device)] + position + self.decoder_type_embed(types_t)
        decoded = self._run(self.decoder_blocks, self.decoder_norm, x, seqlens_dec)  # [T_dec, Dd]
        return decoded, image_targets, text_targets

    def forward(self, inputs: Inputs, image_ratio: float = 0.75, text_ratio: float = 0.75, seed: int = 0,
                weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                normalisers: Optional[dict[str, float]] = None, plans=None,
                alignment: tuple[float, float] = (0.0, 0.0)) -> Output:
        """`normalisers`: global counts of masked patches / paired / unpaired text tokens (for DDP);
        defaults to this batch's own counts, i.e. plain means."""
        plans = plans or self.random_masking(inputs, image_ratio, text_ratio, seed)
        encoded, seqlens, _ = self.forward_encoder(inputs, plans)
        decoded, image_targets, text_targets = self.forward_decoder(encoded, seqlens, inputs, plans)
        device = decoded.device
        zero = decoded.sum() * 0.0  # keeps the graph connected when a part has no targets

        image_loss_sum = zero
        if image_targets:
            rows = torch.tensor([t[0] for t in image_targets], device=device)
            prediction = self.image_head(decoded[rows])  # [M, p*p*3]
            target = self.patchify(inputs.images)[
                torch.tensor([t[1] for t in image_targets], device=device),
                torch.tensor([t[2] for t in image_targets], device=device)]
            if self.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1e-6) ** 0.5
            image_loss_sum = ((prediction - target) ** 2).mean(dim=-1).sum()

        paired_sum, unpaired_sum = zero, zero
        paired_count = sum(1 for t in text_targets if t[3])
        unpaired_count = len(text_targets) - paired_count
        if text_targets:
            rows = torch.tensor([t[0] for t in text_targets], device=device)
            logits = self.text_head(decoded[rows])  # [M, vocab]
            target = inputs.tokens[torch.tensor([t[1] for t in text_targets], device=device)]
            losses = F.cross_entropy(logits.float(), target, reduction="none")
            paired = torch.tensor([t[3] for t in text_targets], device=device)
            paired_sum = losses[paired].sum()
            unpaired_sum = losses[~paired].sum()

        counts = {"image": len(image_targets), "paired_text": paired_count, "unpaired_text": unpaired_count}
        norm = normalisers or counts
        image_loss = image_loss_sum / max(1, norm["image"])
        text_loss = paired_sum / max(1, norm["paired_text"])
        unpaired_loss = unpaired_sum / max(1, norm["unpaired_text"])
        loss = weights[0] * image_loss + weights[1] * text_loss + weights[2] * unpaired_loss
        itc = itm = None
        if self.alignment and (alignment[0] or alignment[1]):
            itc, itm = self.alignment_losses(inputs, seed)
            loss = loss + alignment[0] * itc + alignment[1] * itm
        return Output(loss, image_loss, text_loss, unpaired_loss, counts, sum(seqlens), len(decoded), itc, itm)

    # -- alignment (MaskVLM) ------------------------------------------------------------

    def cls_features(self, inputs: Inputs) -> torch.Tensor:
        """Unmasked forward of whatever each sample holds -> its CLS [B, D] (with gradients)."""
        plans = []
        for index, length in enumerate(inputs.token_lengths.tolist()):
            has_image = int(inputs.image_index[index]) >= 0
            everything = torch.arange(self.num_patches) if has_image else torch.empty(0, dtype=torch.long)
            plans.append((everything, everything[:0], torch.arange(length), torch.empty(0, dtype=torch.long)))
        encoded, seqlens, _ = self.forward_encoder(inputs, plans)
        starts = torch.tensor([0, *seqlens[:-1]], device=encoded.device).cumsum(0)
        return encoded[starts]

    def alignment_losses(self, inputs: Inputs, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC between image-only and text-only passes of the paired samples (gathered over ranks),
        and ITM on joint passes: each pair, plus one hard negative text per image and one hard
        negative image per text, drawn from the in-batch ITC similarities."""
        device = self.cls_token.device
        lengths = inputs.token_lengths.tolist()
        paired = [i for i in range(len(lengths)) if int(inputs.image_index[i]) >= 0 and lengths[i] > 0]
        zero = self.logit_scale.sum() * 0.0
        if len(paired) < 2:
            return zero, zero
        token_rows = torch.split(inputs.tokens, lengths)
        images = inputs.images[inputs.image_index[paired]]
        texts = [token_rows[i] for i in paired]
        n = len(paired)

        def make(image_rows, text_rows) -> Inputs:
            has_image = image_rows is not None
            return Inputs(
                images=images[image_rows] if has_image else images[:0],
                image_index=torch.arange(len(image_rows if has_image else text_rows)) if has_image
                else torch.full((len(text_rows),), -1),
                tokens=torch.cat([texts[j] for j in text_rows]) if text_rows is not None else inputs.tokens[:0],
                token_lengths=torch.tensor([len(texts[j]) for j in text_rows]) if text_rows is not None
                else torch.zeros(len(image_rows), dtype=torch.long),
                ids=[str(k) for k in range(len(image_rows if has_image else text_rows))],
            )

        image_z = F.normalize(self.itc_image_proj(self.cls_features(make(list(range(n)), None))), dim=-1)
        text_z = F.normalize(self.itc_text_proj(self.cls_features(make(None, list(range(n))))), dim=-1)
        all_image, all_text, offset = _gather(image_z), _gather(text_z), _rank_offset(n, image_z.device)
        scale = self.logit_scale.exp().clamp(max=100)
        labels = torch.arange(n, device=device) + offset
        itc = (F.cross_entropy(scale * image_z @ all_text.T, labels)
               + F.cross_entropy(scale * text_z @ all_image.T, labels)) / 2

        with torch.no_grad():  # hard negatives, sampled in proportion to similarity
            similarity = (image_z @ text_z.T).float()
            similarity.fill_diagonal_(-float("inf"))
            generator = torch.Generator(device="cpu").manual_seed(seed)
            negative_text = torch.multinomial(similarity.softmax(dim=1).cpu(), 1, generator=generator).flatten()
            negative_image = torch.multinomial(similarity.T.softmax(dim=1).cpu(), 1, generator=generator).flatten()
        image_rows = list(range(n)) + list(range(n)) + negative_image.tolist()
        text_rows = list(range(n)) + negative_text.tolist() + list(range(n))
        logits = self.itm_head(self.cls_features(make(image_rows, text_rows)))
        targets = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(device)
        return itc, F.cross_entropy(logits.float(), targets)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """Unmasked image-only forward -> [N, D] features: the CLS token, or the mean of the patches."""
        tokens = self.patch_embed(self.patchify(images)) + self.image_pos + self.type_embed.weight[IMAGE]
        cls = (self.cls_token + self.type_embed.weight[CLS]).expand(len(images), 1, -1)
        x = torch.cat([cls, tokens], dim=1)  # [N, 1+P, D]: equal lengths, no padding needed
        seqlens = [x.shape[1]] * len(images)
        encoded = self._run(self.blocks, self.norm, x.reshape(-1, x.shape[-1]), seqlens)
        encoded = encoded.view(len(images), -1, encoded.shape[-1])
        return encoded[:, 0] if pool == "cls" else encoded[:, 1:].mean(dim=1)


class _AllGather(torch.autograd.Function):
    """All ranks' equal-shaped tensors stacked; the backward sums every rank's gradient for our slice.

    Ten lines over plain c10d calls: ``torch.distributed.nn.functional.all_gather`` warns that it
    is deprecated on every call (torch 2.13) and its suggested replacement is a private module.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank = dist.get_rank()
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def _gather(features: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (with gradients for ours); ranks may hold different numbers of rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(features)], device=features.device))
    width = int(max(size.item() for size in sizes))
    parts = _AllGather.apply(F.pad(features, (0, 0, 0, width - len(features))))
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)])


def _rank_offset(count: int, device: torch.device | str = "cpu") -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([count], device=device))  # NCCL takes device tensors only
    return int(sum(size.item() for size in sizes[: dist.get_rank()]))


def _sample_seed(seed: int, sample_id: str) -> int:
    import hashlib

    digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def build_model(preset: str, vocab_size: int, image_size: int, max_text_tokens: int,
                norm_pix_loss: bool = True, alignment: bool = False) -> MultimodalMAE:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (choose from {', '.join(PRESETS)})")
    return MultimodalMAE(PRESETS[preset], vocab_size, image_size, max_text_tokens, norm_pix_loss, alignment)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def flops_per_token(size: ModelSize) -> float:
    """Approximate training FLOPs per encoder token (6 * parameters of the encoder blocks)."""
    per_block = 12 * size.dim**2  # qkv + proj (4 d^2) and the MLP (8 d^2) weights
    return 6.0 * per_block * size.depth
