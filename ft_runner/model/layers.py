"""Tensor-parallel layers: the model body calls these and reads like single-device code.

Weights are held as [out, in] (torch's Linear layout) for the local shard. A quantized projection
(model/quant.py) holds int8 or e4m3 `weight` with fp32 per-output-channel `weight_scale`, and runs
through ops.linear (Triton on GPUs); the others through F.linear.
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


class _Linear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.weight_scale = None  # (out,) fp32 once quantized
        self.quant = None  # None, or the quantization (int8_wo, fp8) of `weight`

    def set_quantized(self, qw) -> None:
        """Hold a QuantizedWeight (model/quant.py) of this shard's weight instead of the weight."""
        assert qw.q.shape == self.weight.shape, (qw.q.shape, self.weight.shape)
        self.weight = nn.Parameter(qw.q, requires_grad=False)
        self.weight_scale = nn.Parameter(qw.scale, requires_grad=False)
        self.quant = qw.kind

    @property
    def qweight(self):
        """The weight as ops.linear takes it: the tensor, or its QuantizedWeight."""
        if self.quant is None:
            return self.weight
        from ft_runner.model.quant import QuantizedWeight

        return QuantizedWeight(self.weight, self.weight_scale, self.quant)

    def _product(self, x, bias):
        if self.quant is None:
            return F.linear(x, self.weight, bias)
        from ft_runner.kernels import ops  # ops imports this module

        flat = ops.linear(x.reshape(-1, x.shape[-1]), self.qweight, bias)
        return flat.view(*x.shape[:-1], flat.shape[-1])


class ColumnParallelLinear(_Linear):
    """y_local = x W_local^T + b_local: each rank computes its slice of the output features."""

    def __init__(self, in_features: int, out_local: int, bias: bool = True):
        super().__init__(out_local, in_features, bias)

    def forward(self, x):
        return self._product(x, self.bias)


class RowParallelLinear(_Linear):
    """y = sum over ranks of x_local W_local^T, then + b (added once, after the reduce)."""

    def __init__(self, in_local: int, out_features: int, group, bias: bool = True):
        super().__init__(out_features, in_local, bias)
        self.group = group

    def forward(self, x):
        y = all_reduce(self._product(x, None), self.group)
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
