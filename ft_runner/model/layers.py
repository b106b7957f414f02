"""Tensor-parallel layers: the model body calls these and reads like single-device code.

Weights are held as [out, in] (torch's Linear layout) for the local shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local: each rank computes its slice of the output features."""

    def __init__(self, in_features: int, out_local: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_local, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T, then + b (added once, after the reduce)."""

    def __init__(self, in_local: int, out_features: int, group, bias: bool = True):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_local), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x):
        y = all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def vocab_slice_lookup(ids, weight, start: int) -> torch.Tensor:
    """Rows weight[ids - start], zero for ids outside this rank's vocabulary slice [start, start + rows)."""
    local = ids - start
    inside = (local >= 0) & (local < weight.shape[0])
    return F.embedding(local.clamp(0, weight.shape[0] - 1), weight) * inside.unsqueeze(-1).to(weight.dtype)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [start, start + local) of the (padded) vocabulary."""

    def __init__(self, vocab_local: int, hidden: int, tp_rank: int, group):
        super().__init__()
        self.group = group
        self.start = tp_rank * vocab_local
        self.weight = nn.Parameter(torch.empty(vocab_local, hidden), requires_grad=False)

    def forward(self, ids):
        return all_reduce(vocab_slice_lookup(ids, self.weight, self.start), self.group)


class ParallelLMHead(nn.Module):
    """logits = h E^T over the whole vocabulary, gathered from every rank's vocabulary slice."""

    def __init__(self, vocab_local: int, hidden: int, vocab_size: int, group, bias: bool = False):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_local, hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(vocab_local), requires_grad=False) if bias else None

    def forward(self, h):
        local = F.linear(h, self.weight, self.bias)
        if self.group is not None and dist.get_world_size(self.group) > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, local.contiguous(), group=self.group)
            local = torch.cat(parts, dim=-1)
        return local[..., : self.vocab_size]
