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
    elif config.rope_type == "yarn":
        inv = _yarn(inv, dim, config.rope_theta, params)
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


def _yarn(inv: torch.Tensor, dim: int, theta: float, params: dict) -> torch.Tensor:
    """YaRN (Peng et al. 2023), as HF computes it: frequencies that turn fewer than beta_slow times over
    the trained context are divided by `factor`, those turning more than beta_fast times are kept, and
    a linear ramp over the dims blends the two in between."""
    context = params["original_max_position_embeddings"]

    def dim_turning(turns: float) -> float:  # the (fractional) dim whose wavelength fits `turns` turns in the context
        return dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(params["beta_fast"]), dim_turning(params["beta_slow"])
    if params["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (max(high, low + 0.001) - low), 0, 1)
    return inv / params["factor"] * ramp + inv * (1 - ramp)


class Rotary:
    """cos/sin tables for one forward pass; applied to the first `rotary_embedding` dims of each head."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.interleaved = not config.neox_rotary_style  # GPT-J rotates pairs (0,1), (2,3), ...
        self.dynamic = config.rope_type == "dynamic"
        self.inv = None if self.dynamic else inv_freq(config)
        self.scale = float(config.rope_params.get("attention_factor", 1.0))  # YaRN scales cos and sin

    def tables(self, positions: torch.Tensor, seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S), seq_len (B,) -> cos, sin (B, 1, S, dims) in fp32."""
        inv = inv_freq(self.config, seq_len)[:, None, :] if self.dynamic else self.inv
        freqs = positions[..., None].float() * inv.to(positions.device)  # (B, S, dims/2)
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[:, None] * self.scale, emb.sin()[:, None] * self.scale


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
