"""Attention backends over the two sequence layouts the model uses.

- **packed**: all samples of a batch concatenated into one sequence `[1, T, ...]` with their
  lengths (`seqlens`); no padding anywhere. On CUDA this runs xformers'
  `memory_efficient_attention` with a `BlockDiagonalMask`. Elsewhere a reference computes
  the same thing with one torch SDPA call: the sequences are spread on a padded grid for the
  attention only (every other op of a block runs on the packed rows).
- **padded**: `[B, L, ...]` with a key-padding mask, torch `scaled_dot_product_attention`.

`resolve_backend("auto")` picks xformers on packed rows when it can run (CUDA + a working
install) and packed rows with one SDPA call otherwise; it never fails on CPU. `sdpa` asks for
the padded layout (the reference the packed paths are tested against).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from .layout import Sequences

log = logging.getLogger("mmae.attention")


@dataclass
class Arrangement:
    """How the token rows of a batch are arranged for the blocks."""

    kind: str  # "packed" | "padded"
    backend: str  # "xformers" | "sdpa"
    sequences: Sequences
    _bias: object = None  # cached xformers BlockDiagonalMask

    def xformers_bias(self):
        if self._bias is None:
            from xformers.ops import fmha

            self._bias = fmha.BlockDiagonalMask.from_seqlens(self.sequences.seqlens)
        return self._bias


def xformers_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from xformers.ops import fmha, memory_efficient_attention  # noqa: F401

        q = torch.zeros(1, 4, 1, 8, device="cuda", dtype=torch.float16)
        memory_efficient_attention(q, q, q)
        return True
    except Exception as error:  # noqa: BLE001 - any failure means "cannot run here"
        log.info("xformers cannot run here (%s)", error)
        return False


def resolve_backend(requested: str) -> tuple[str, str]:
    """(backend, layout) for `attention: auto | xformers | sdpa`."""
    if requested == "sdpa":
        return "sdpa", "padded"
    if requested == "xformers":
        if not xformers_available():
            raise RuntimeError("train.attention: xformers needs CUDA and a working xformers install; "
                               "use `auto` or `sdpa`")
        return "xformers", "packed"
    if xformers_available():
        return "xformers", "packed"
    # Packed rows with one SDPA call run 1.26-1.31x the padded layout's tokens/s on CPU
    # (benchmarks/train_step.py, docs/BENCHMARKS.md): the MLPs and projections skip the padding.
    return "sdpa", "packed"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arrangement: Arrangement) -> torch.Tensor:
    """q, k, v: [N, L, H, Dh] -> [N, L, H, Dh]."""
    sequences = arrangement.sequences
    if arrangement.kind == "padded":
        return _padded_sdpa(q, k, v, None if sequences.uniform else sequences.key_padding)
    if arrangement.backend == "xformers":
        from xformers.ops import memory_efficient_attention

        return memory_efficient_attention(q, k, v, attn_bias=arrangement.xformers_bias())
    # Packed rows without xformers: one SDPA call over the sequences spread on a padded grid
    # (attention only; the rest of the block runs on the packed rows), then gathered back.
    width = sequences.width
    count = len(sequences.seqlens)
    if sequences.uniform:  # equal lengths (image-only batches): a reshape, no padding, no mask
        grid = [x.view(count, width, *x.shape[2:]) for x in (q, k, v)]
        return _padded_sdpa(*grid, None).reshape(q.shape)

    def spread(x: torch.Tensor) -> torch.Tensor:
        grid = x.new_zeros(count * width, *x.shape[2:])
        grid[sequences.padded_index] = x[0]
        return grid.view(count, width, *x.shape[2:])

    out = _padded_sdpa(spread(q), spread(k), spread(v), sequences.key_padding)
    return out.reshape(count * width, *q.shape[2:])[sequences.padded_index].unsqueeze(0)


def _padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding: Optional[torch.Tensor]) -> torch.Tensor:
    mask = key_padding[:, None, None, :] if key_padding is not None else None  # [B, 1, 1, L]: real keys only
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def to_layout(x: torch.Tensor, sequences: Sequences, kind: str, backend: str) -> tuple[torch.Tensor, Arrangement]:
    """Packed rows [T, D] -> the tensor the blocks run on, and its Arrangement."""
    if kind == "packed":
        return x.unsqueeze(0), Arrangement("packed", backend, sequences)
    if sequences.uniform:  # nothing to pad
        return x.view(len(sequences.seqlens), sequences.width, -1), Arrangement("padded", "sdpa", sequences)
    padded = x.new_zeros(len(sequences.seqlens) * sequences.width, x.shape[-1])
    padded[sequences.padded_index] = x
    return padded.view(len(sequences.seqlens), sequences.width, -1), Arrangement("padded", "sdpa", sequences)


def from_layout(x: torch.Tensor, arrangement: Arrangement) -> torch.Tensor:
    """Back to packed rows [T, D]."""
    if arrangement.kind == "packed":
        return x.squeeze(0)
    if arrangement.sequences.uniform:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])[arrangement.sequences.padded_index]
