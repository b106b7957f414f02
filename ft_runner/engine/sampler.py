"""Per-row sampling with no host sync: greedy, temperature, top-k, top-p, penalties.

Random draws come from a counter-based hash of (seed, step, token id), so a row's tokens depend
only on its own seed and logits, never on its batch neighbours or on the device's RNG state.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SamplingParams:
    """One value per row, as tensors of shape (B,) on the model's device."""

    top_k: torch.Tensor  # int64; 0 = no top-k filter
    top_p: torch.Tensor  # float32; 0 = no top-p filter
    temperature: torch.Tensor  # float32
    repetition_penalty: torch.Tensor  # float32; 1 = off
    presence_penalty: torch.Tensor  # float32; 0 = off
    min_length: torch.Tensor  # int64: end_id is forbidden before this many new tokens
    seed: torch.Tensor  # int64

    @property
    def greedy(self) -> torch.Tensor:
        """FT: top_k in {0, 1} with top_p == 0 means greedy."""
        return (self.top_k <= 1) & (self.top_p <= 0)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer hash on int64 tensors holding 32-bit values."""
    mask = 0xFFFFFFFF
    x = x & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(B, vocab) uniforms in (0, 1), a pure function of (seed, step, token id)."""
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    h = _hash32(seed[:, None] * 0x9E3779B1 + _hash32(ids[None, :] + step * 0x632BE5AB))
    h = _hash32(h ^ (seed[:, None] >> 32))
    return (h.to(torch.float64) + 0.5) / 4294967296.0


def apply_penalties(logits, counts, params: SamplingParams, generated: int, end_id: torch.Tensor):
    """counts (B, V): how often each token occurs so far (prompt and output)."""
    seen = counts > 0
    rep = params.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - params.presence_penalty[:, None] * seen.to(logits.dtype)
    too_short = (generated < params.min_length)[:, None]
    forbid_end = too_short & (torch.arange(logits.shape[1], device=logits.device)[None, :] == end_id[:, None])
    return logits.masked_fill(forbid_end, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, step: int):
    """logits (B, V) fp32 after penalties -> (tokens (B,), log-probs of those tokens (B,))."""
    scaled = logits / params.temperature.clamp_min(1e-6)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    filtered = _top_k_top_p(scaled, params.top_k, params.top_p)
    gumbel = -torch.log(-torch.log(uniform(params.seed, step, logits.shape[1]))).to(logits.dtype)
    drawn = torch.argmax(filtered + gumbel, dim=-1)
    tokens = torch.where(params.greedy, torch.argmax(logits, dim=-1), drawn)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def _top_k_top_p(logits, top_k, top_p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
    drop |= (top_p[:, None] > 0) & (before >= top_p[:, None])
    drop[:, 0] = False  # always keep the best token
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
