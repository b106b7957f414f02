"""Quantized weights: per-output-channel symmetric int8 or fp8 (e4m3), and the fp8 rounding of
activations and KV-cache entries. Pure tensor math; ops.linear runs the products.

A weight W (N, K) becomes q (N, K) and scale (N,) fp32 with W[n] ~ scale[n] * q[n]:
- int8: scale = max|W[n]| / 127, q = round(W / scale) in [-127, 127] (FT's int8_mode 1, symmetric);
- fp8: scale = max|W[n]| / 448, q = e4m3(W / scale), saturated to the format's +-448.
A channel's scale is taken over its whole input (all of K), whatever the tensor-parallel split:
a row-parallel shard keeps the whole channel's scale, so the model is the same on any TP.
"""

from __future__ import annotations

import dataclasses

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
INT8_MAX = 127.0
QUANT_DTYPES = {"int8_wo": torch.int8, "fp8": FP8}
_TINY = 1e-12  # an all-zero channel keeps a positive scale


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """q (N, K) int8 or e4m3, scale (N,) fp32: W ~ scale[:, None] * q. `kind` is int8_wo or fp8
    (fp8 also quantizes the activations, per token, before the product)."""

    q: torch.Tensor
    scale: torch.Tensor
    kind: str

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W ~ scale * q (N, K) in `dtype`, computed in fp32."""
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)


def is_quantized(weight) -> bool:
    return isinstance(weight, QuantizedWeight)


def channel_scale(w: torch.Tensor, kind: str) -> torch.Tensor:
    """The fp32 scales (N,) of a weight (N, K): max |W[n]| over the whole row, over the format's largest value."""
    top = INT8_MAX if kind == "int8_wo" else FP8_MAX
    return (w.float().abs().amax(dim=1) / top).clamp_min(_TINY)


def quantize(w: torch.Tensor, kind: str, scale: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a weight (N, K) per output channel; `scale` (N,) if the channels' scales are known
    (a row-parallel shard takes its whole channels' scales)."""
    scale = channel_scale(w, kind) if scale is None else scale.float()
    scaled = w.float() / scale[:, None]
    if kind == "int8_wo":
        q = scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    elif kind == "fp8":
        q = to_fp8(scaled)
    else:
        raise ValueError(f"unknown quantization {kind!r}")
    return QuantizedWeight(q.contiguous(), scale.contiguous(), kind)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """e4m3 of x (already scaled), saturated: torch's cast turns values past +-448 into NaN."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) dynamic scaling: x (M, K) -> (e4m3 (M, K), fp32 scales (M,)), x ~ scale * q."""
    scale = (x.float().abs().amax(dim=1) / FP8_MAX).clamp_min(_TINY)
    return to_fp8(x.float() / scale[:, None]), scale


def fake_quantize_rows_fp8(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the fp8 products see it (per-token scales), in fp32 (M, K)."""
    q, scale = quantize_rows_fp8(x)
    return q.float() * scale[:, None]


def cat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack along N (fused projections): each channel keeps its own scale."""
    kinds = {w.kind for w in weights}
    assert len(kinds) == 1, f"one quantization per fused projection, got {kinds}"
    return QuantizedWeight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]), kinds.pop())


def quantized_linears(stage):
    """The projections that quantization applies to: every decoder layer's (not the embeddings, nor
    the LM head, which stay in the model dtype), as (name, module)."""
    from ft_runner.model.layers import ColumnParallelLinear, RowParallelLinear

    for name, module in stage.layers.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            yield name, module


def quantize_stage(stage, kind: str) -> None:
    """Quantize every layer projection of a stage in place from its own weights (each shard's rows
    over its own columns: exact per-channel scales for whole weights and column-parallel shards; the
    loader gives row-parallel shards their whole channels' scales instead)."""
    for _, module in quantized_linears(stage):
        if module.quant is None:
            module.set_quantized(quantize(module.weight, kind))


def quantize_ft_kernel(kernel) -> tuple:
    """int8 of a kernel in FT's layout [in, ...out] (numpy): (q int8 of the same shape, fp32 scales
    shaped as the output axes), quantized per output channel over all of `in`."""
    import numpy as np

    k = kernel.shape[0]
    qw = quantize(torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32)).reshape(k, -1).T, "int8_wo")
    return qw.q.T.reshape(kernel.shape).numpy(), qw.scale.reshape(kernel.shape[1:]).numpy()
