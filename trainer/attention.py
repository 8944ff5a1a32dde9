"""Attention backends over the two sequence layouts the model uses.

- **packed**: all samples of a batch concatenated into one sequence `[1, T, ...]` with their
  lengths (`seqlens`); no padding anywhere. On CUDA this runs xformers'
  `memory_efficient_attention` with a `BlockDiagonalMask`. Elsewhere a reference computes
  the same thing with torch SDPA, one sequence at a time (no cross-sample attention).
- **padded**: `[B, L, ...]` with a key-padding mask, torch `scaled_dot_product_attention`.

`resolve_backend("auto")` picks xformers when it can run (CUDA + a working install) and SDPA
on padded batches otherwise; it never fails on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("mmae.attention")


@dataclass
class Layout:
    """How the token rows of a batch are arranged."""

    kind: str  # "packed" | "padded"
    seqlens: list[int]
    backend: str  # "xformers" | "sdpa"
    key_padding: Optional[torch.Tensor] = None  # [B, L] True for real tokens (padded only)
    _bias: object = None  # cached xformers BlockDiagonalMask

    def xformers_bias(self):
        if self._bias is None:
            from xformers.ops import fmha

            self._bias = fmha.BlockDiagonalMask.from_seqlens(self.seqlens)
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
    return "sdpa", "padded"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """q, k, v: [N, L, H, Dh] -> [N, L, H, Dh]."""
    if layout.kind == "padded":
        mask = layout.key_padding[:, None, None, :]  # [B, 1, 1, L]: attend to real keys only
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    if layout.backend == "xformers":
        from xformers.ops import memory_efficient_attention

        return memory_efficient_attention(q, k, v, attn_bias=layout.xformers_bias())
    # Packed reference without xformers: attention within each sequence, by torch SDPA.
    outputs = []
    for qs, ks, vs in zip(q.split(layout.seqlens, dim=1), k.split(layout.seqlens, dim=1),
                          v.split(layout.seqlens, dim=1)):
        outputs.append(F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2),
                                                      vs.transpose(1, 2)).transpose(1, 2))
    return torch.cat(outputs, dim=1)


def pack_index(seqlens: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """For padded [B, L]: (flat index of every real token in B*L order, key-padding mask)."""
    lengths = torch.tensor(seqlens, device=device)
    width = int(lengths.max()) if len(seqlens) else 0
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    return mask.flatten().nonzero().squeeze(1), mask


def to_layout(x: torch.Tensor, seqlens: list[int], kind: str, backend: str) -> tuple[torch.Tensor, Layout]:
    """Packed rows [T, D] -> the tensor the blocks run on, and its Layout."""
    if kind == "packed":
        return x.unsqueeze(0), Layout("packed", seqlens, backend)
    index, mask = pack_index(seqlens, x.device)
    padded = x.new_zeros(len(seqlens) * mask.shape[1], x.shape[-1])
    padded[index] = x
    return padded.view(len(seqlens), mask.shape[1], -1), Layout("padded", seqlens, "sdpa", key_padding=mask)


def from_layout(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Back to packed rows [T, D]."""
    if layout.kind == "packed":
        return x.squeeze(0)
    index, _ = pack_index(layout.seqlens, x.device)
    return x.reshape(-1, x.shape[-1])[index]
