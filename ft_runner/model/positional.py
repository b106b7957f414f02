"""Positions inside attention: rotary embeddings (RoPE, with its scaling variants) and ALiBi slopes."""

from __future__ import annotations

import math

import torch

from ft_runner.config import ModelConfig


def inv_freq(config: ModelConfig, seq_len: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE inverse frequencies (dims/2,) in fp32; (B, dims/2) for `dynamic` given each row's length (B,)."""
    dim, params = config.rotary_embedding, config.rope_params
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = torch.tensor(config.rope_theta, dtype=torch.float32)
    if config.rope_type == "dynamic":  # NTK-aware: stretch the base once a row outgrows the trained context
        original = params["original_max_position_embeddings"]
        factor = params["factor"]
        seq_len = torch.clamp(seq_len.cpu(), min=original)
        base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base[:, None] ** exponent[None, :])
    inv = 1.0 / (base ** exponent)
    if config.rope_type == "linear":
        inv = inv / params["factor"]
    elif config.rope_type == "llama3":
        inv = _llama3(inv, params)
    return inv


def _llama3(inv: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > context / low, inv / factor, inv)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, blended, scaled)


class Rotary:
    """cos/sin tables for one forward pass; applied to the first `rotary_embedding` dims of each head."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.interleaved = not config.neox_rotary_style  # GPT-J rotates pairs (0,1), (2,3), ...
        self.dynamic = config.rope_type == "dynamic"
        self.inv = None if self.dynamic else inv_freq(config)

    def tables(self, positions: torch.Tensor, seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S), seq_len (B,) -> cos, sin (B, 1, S, dims) in fp32."""
        inv = inv_freq(self.config, seq_len)[:, None, :] if self.dynamic else self.inv
        freqs = positions[..., None].float() * inv.to(positions.device)  # (B, S, dims/2)
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (B, heads, S, head_dim): rotate its first cos.shape[-1] features."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    if interleaved:  # (x0, x1) -> (-x1, x0) for every pair
        turned = torch.stack([-rot[..., 1::2], rot[..., ::2]], dim=-1).flatten(-2)
    else:  # first half, second half -> (-second, first)
        half = dim // 2
        turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    rot = rot * cos.to(x.dtype) + turned * sin.to(x.dtype)
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi head slopes (heads,) fp32: a geometric series, interleaved with a second one when `heads`
    is not a power of two (Press et al.; BLOOM)."""
    closest = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        extra = min(closest, heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32))])
    return slopes
