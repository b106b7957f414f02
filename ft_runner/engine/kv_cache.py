"""A preallocated KV cache for one pipeline stage; on GPUs one lives across batches (generator.py)."""

from __future__ import annotations

import dataclasses

import torch

from ft_runner.kernels import ops


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

    def attend(self, layer: int, qkv, positions, heads: int, kv_heads: int, head_dim: int, scale: float,
               rope=None, out=None):
        """ops.decode_attention over this cache's layer (the fused decoder's one attention call)."""
        return ops.decode_attention(qkv, self.k[layer], self.v[layer], positions, heads, kv_heads, head_dim, scale,
                                    rope, out)
