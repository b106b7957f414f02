"""A preallocated KV cache for one generation batch on one pipeline stage."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class KVCache:
    k: torch.Tensor  # (layers, B, heads, T, head_dim); row b's token at position t sits at [:, b, :, t]
    v: torch.Tensor

    @classmethod
    def allocate(cls, layers: int, batch: int, heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (layers, batch, heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
