"""A preallocated KV cache for one pipeline stage; on GPUs one lives across batches (generator.py)."""

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

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rows(self, count: int) -> KVCache:
        """The first `count` rows (views)."""
        return KVCache(self.k[:, :count], self.v[:, :count])
