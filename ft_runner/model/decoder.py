"""The GPT decoder, pure tensor math. One pipeline stage holds a contiguous range of layers;
the first stage also embeds, the last one also applies the final layernorm and the LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ft_runner.config import ModelConfig
from ft_runner.model.layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                    VocabParallelEmbedding)


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: int, group):
        super().__init__()
        self.heads = config.head_num // tp
        self.head_dim = config.size_per_head
        local = self.heads * self.head_dim
        self.qkv = ColumnParallelLinear(config.hidden_size, 3 * local)
        self.dense = RowParallelLinear(local, config.hidden_size, group)

    def forward(self, x, cache_k, cache_v, positions, prefill: bool):
        """x (B, S, H); caches (B, heads, T, head_dim); positions (B,) of each row's new token."""
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if prefill:  # the prompts sit at positions 0..S-1 of every row (right-padded)
            cache_k[:, :, :S] = k
            cache_v[:, :, :S] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # one new token per row, at that row's own position
            rows = torch.arange(B, device=x.device)
            cache_k[rows, :, positions] = k[:, :, 0]
            cache_v[rows, :, positions] = v[:, :, 0]
            keys = torch.arange(cache_k.shape[2], device=x.device)
            mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
            out = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: int, group):
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.inter_size // tp)
        self.fc2 = RowParallelLinear(config.inter_size // tp, config.hidden_size, group)
        self.relu = config.activation_type.lower() == "relu"

    def forward(self, x):
        h = self.fc1(x)
        h = F.relu(h) if self.relu else F.gelu(h, approximate="tanh")  # FT's Gelu is the tanh form
        return self.fc2(h)


class Block(nn.Module):
    """Pre-layernorm transformer block."""

    def __init__(self, config: ModelConfig, tp: int, group):
        super().__init__()
        eps = config.layernorm_eps
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = Attention(config, tp, group)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = MLP(config, tp, group)

    def forward(self, h, cache_k, cache_v, positions, prefill):
        h = h + self.attn(self.ln1(h), cache_k, cache_v, positions, prefill)
        return h + self.mlp(self.ln2(h))


class GPTStage(nn.Module):
    def __init__(self, config: ModelConfig, grid, group):
        super().__init__()
        self.config = config
        per_stage = config.num_layer // grid.pp
        self.first_layer = grid.pp_rank * per_stage
        self.layers = nn.ModuleList(Block(config, grid.tp, group) for _ in range(per_stage))
        vocab_local = padded_vocab(config.vocab_size, grid.tp) // grid.tp
        h = config.hidden_size
        self.wte = VocabParallelEmbedding(vocab_local, h, grid.tp_rank, group) if grid.is_first_stage else None
        self.wpe = nn.Embedding(config.max_pos_seq_len, h) if grid.is_first_stage else None
        self.ln_f = nn.LayerNorm(h, eps=config.layernorm_eps) if grid.is_last_stage else None
        self.lm_head = ParallelLMHead(vocab_local, h, config.vocab_size, group) if grid.is_last_stage else None
        self.requires_grad_(False)

    def embed(self, ids, positions):
        """ids, positions (B, S) -> (B, S, H)."""
        h = self.wte(ids)
        return h + self.wpe(positions) if self.config.has_positional_encoding else h

    def forward(self, h, cache, positions, prefill: bool):
        for layer, block in enumerate(self.layers):
            h = block(h, cache.k[layer], cache.v[layer], positions, prefill)
        return h

    def logits(self, h):
        """h (B, H) -> fp32 logits (B, vocab_size)."""
        return self.lm_head(self.ln_f(h)).float()
