"""The decoder, pure tensor math. One pipeline stage holds a contiguous range of layers; the first
stage also embeds, the last one also applies the final norm and the LM head.

One block serves every family; the config's flags pick the variant:
- norm: LayerNorm or RMSNorm (`norm_type`), before (`pre_layernorm`) or after (`post_layernorm`,
  OPT-350m) each residual add;
- residual: sequential, or attention and MLP in parallel off one input (`use_gptj_residual`: GPT-J
  with one shared layernorm, GPT-NeoX with two);
- positions: a learned table (`has_positional_encoding`), rotary (`rotary_embedding` dims, halves
  or interleaved pairs) or ALiBi (`use_attention_linear_bias`);
- attention: grouped KV heads (`kv_head_num`), sliding window (`sliding_window`);
- MLP: plain or gated (`activation_type` ending in GLU); biases where the `has_*_bias` flags say.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ft_runner.config import ModelConfig
from ft_runner.kernels import ops
from ft_runner.model.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from ft_runner.model.positional import Rotary, alibi_slopes, apply_rotary

ACTIVATIONS = {
    "Gelu": lambda x: F.gelu(x, approximate="tanh"),  # FT's Gelu is the tanh form (GPT-2's gelu_new)
    "GeluExact": F.gelu,
    "Relu": F.relu,
    "Silu": F.silu,
    "GeGLU": lambda x: F.gelu(x, approximate="tanh"),
    "SiGLU": F.silu,
}


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like the LLaMA reference."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.hidden_size, config.layernorm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)


@dataclasses.dataclass
class Step:
    """What every layer of one forward pass shares."""

    prefill: bool
    positions: torch.Tensor  # (B, S) position of each new token
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin (B, 1, S, rotary dims); paged: (N, 1, 1, dims)
    paged: object | None = None  # the in-flight engine's step (engine/model_runner.PagedBatch): flat tokens


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, grid, group, window: int):
        super().__init__()
        self.heads = config.head_num // grid.tp
        self.kv_heads = config.local_kv_heads(grid.tp)
        self.head_dim = config.size_per_head
        self.window = window
        self.interleaved = not config.neox_rotary_style
        self.qkv = ColumnParallelLinear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim,
                                        bias=config.has_qkv_bias)
        self.dense = RowParallelLinear(self.heads * self.head_dim, config.hidden_size, group,
                                       bias=config.has_attention_out_bias)
        self.slopes = None  # ALiBi slopes of this rank's heads, kept in fp32 whatever the model dtype
        if config.use_attention_linear_bias:
            self.slopes = alibi_slopes(config.head_num)[grid.tp_rank * self.heads:(grid.tp_rank + 1) * self.heads]

    def forward(self, x, cache_k, cache_v, step: Step, kv_scale=None):
        """x (B, S, H); caches (B, kv_heads, T, head_dim), or paged (one layer of PagedKVCache, with
        its (2,) scales if it holds e4m3)."""
        if step.paged is not None:
            return self._forward_paged(x, cache_k, cache_v, step, kv_scale)
        B, S, _ = x.shape
        qkv = self.qkv(x).view(B, S, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)  # (B, heads, S, head_dim)
        if step.rope is not None:
            q, k = (apply_rotary(t, *step.rope, self.interleaved) for t in (q, k))
        if step.prefill:  # the prompts sit at positions 0..S-1 of every row (right-padded)
            cache_k[:, :, :S] = k
            cache_v[:, :, :S] = v
        else:  # one new token per row, at that row's own position
            rows = torch.arange(B, device=x.device)
            cache_k[rows, :, step.positions[:, 0]] = k[:, :, 0]
            cache_v[rows, :, step.positions[:, 0]] = v[:, :, 0]
            k, v = cache_k, cache_v
        mask = self._mask(step, k.shape[2], q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.dense(out.transpose(1, 2).reshape(B, S, -1))

    def _forward_paged(self, x, cache_k, cache_v, step: Step, kv_scale=None):
        """x (1, N, H): the step's tokens of every sequence, flat; the paged cache's pages of one layer."""
        N = x.shape[1]
        qkv = self.qkv(x[0]).view(N, self.heads + 2 * self.kv_heads, self.head_dim)
        if step.rope is not None:  # (N, heads, 1, head_dim) against cos/sin (N, 1, 1, dims): one row per token
            q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
            q, k = (apply_rotary(t[:, :, None], *step.rope, self.interleaved)[:, :, 0] for t in (q, k))
            qkv = torch.cat([q, k, v], dim=1)
        p = step.paged
        slopes = self.slopes.to(x.device) if self.slopes is not None else None
        out = ops.prefill_attention(qkv.reshape(N, -1), cache_k, cache_v, p.block_tables, p.cu_seqlens,
                                    p.context_lens, p.max_query_len, self.heads, self.kv_heads, self.head_dim,
                                    self.head_dim ** -0.5, None, self.window, slopes, kv_scale=kv_scale)
        return self.dense(out)[None]

    def _mask(self, step: Step, key_len: int, dtype):
        """None for a plain causal prefill; else a boolean mask or an additive ALiBi bias (B, 1|heads, S, T)."""
        if step.prefill and not self.window and self.slopes is None:
            return None
        query = step.positions[:, None, :, None]  # (B, 1, S, 1)
        key = torch.arange(key_len, device=query.device)
        allowed = key <= query
        if self.window:
            allowed &= key > query - self.window
        if self.slopes is None:
            return allowed
        # slope * (key - query): softmax ignores the per-query shift, and nearby keys stay exact in fp16
        bias = self.slopes.to(query.device)[None, :, None, None] * (key - query)
        return bias.masked_fill(~allowed, float("-inf")).to(dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: int, group):
        super().__init__()
        local = config.inter_size // tp
        self.fc1 = ColumnParallelLinear(config.hidden_size, local, bias=config.has_mlp_bias)
        self.up = ColumnParallelLinear(config.hidden_size, local, bias=config.has_mlp_bias) if config.gated else None
        self.fc2 = RowParallelLinear(local, config.hidden_size, group, bias=config.has_mlp_bias)
        self.act = ACTIVATIONS[config.activation_type]

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.up is not None:  # gated: act(gate(x)) * up(x)
            h = h * self.up(x)
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, grid, group, layer: int):
        super().__init__()
        self.ln1 = make_norm(config)
        self.attn = Attention(config, grid, group, config.window(layer))
        self.ln2 = make_norm(config) if config.has_post_attention_layernorm else None
        self.mlp = MLP(config, grid.tp, group)
        self.post_norm = config.layernorm_type == "post_layernorm"
        self.parallel = config.use_gptj_residual

    def forward(self, h, cache_k, cache_v, step: Step, kv_scale=None):
        if self.post_norm:  # OPT-350m: normalise after each residual add
            h = self.ln1(h + self.attn(h, cache_k, cache_v, step, kv_scale))
            return self.ln2(h + self.mlp(h))
        x = self.ln1(h)
        attn = self.attn(x, cache_k, cache_v, step, kv_scale)
        if self.parallel:  # GPT-J (one shared norm) and GPT-NeoX: attention and MLP read the same residual
            return h + attn + self.mlp(x if self.ln2 is None else self.ln2(h))
        h = h + attn
        return h + self.mlp(self.ln2(h))


class GPTStage(nn.Module):
    def __init__(self, config: ModelConfig, grid, group):
        super().__init__()
        self.config = config
        per_stage = config.num_layer // grid.pp
        self.first_layer = grid.pp_rank * per_stage
        self.layers = nn.ModuleList(Block(config, grid, group, self.first_layer + i) for i in range(per_stage))
        vocab_local = padded_vocab(config.vocab_size, grid.tp) // grid.tp
        h, first, last = config.hidden_size, grid.is_first_stage, grid.is_last_stage
        self.wte = VocabParallelEmbedding(vocab_local, h, grid.tp_rank, group) if first else None
        self.wpe = nn.Embedding(config.max_pos_seq_len, h) if first and config.has_positional_encoding else None
        self.ln_embed = make_norm(config) if first and config.has_pre_decoder_layernorm else None
        self.ln_f = make_norm(config) if last and config.has_post_decoder_layernorm else None
        self.lm_head = ParallelLMHead(vocab_local, h, config.vocab_size, group,
                                      bias=config.has_lm_head_bias) if last else None
        self.rotary = Rotary(config) if config.rotary_embedding else None
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the layers' projections may hold int8 or e4m3 weights)."""
        return self.layers[0].ln1.weight.dtype

    def embed(self, ids, positions):
        """ids, positions (B, S) -> (B, S, H)."""
        h = self.wte(ids)
        if self.wpe is not None:
            h = h + self.wpe(positions)
        return h if self.ln_embed is None else self.ln_embed(h)

    def forward(self, h, cache, positions, prefill: bool):
        """h (B, S, H). Prefill: `positions` are the rows' prompt lengths (B,) or None (all S long);
        decode: the position (B,) of each row's one new token."""
        if not torch.is_tensor(positions) and positions is not None:  # the in-flight engine's PagedBatch
            return self._forward_paged(h, cache, positions)
        B, S, _ = h.shape
        if prefill:
            pos = torch.arange(S, device=h.device).expand(B, S)
            seq_len = positions if positions is not None else torch.full((B,), S, device=h.device)
        else:
            pos, seq_len = positions[:, None], positions + 1
        step = Step(prefill, pos, self.rotary.tables(pos, seq_len) if self.rotary is not None else None)
        for layer, block in enumerate(self.layers):
            h = block(h, cache.k[layer], cache.v[layer], step)
        return h

    def _forward_paged(self, h, cache, paged):
        """h (1, N, H): every sequence's tokens of this step; `paged` says whose they are and where."""
        rope = None
        if self.rotary is not None:  # each token its own row, so dynamic RoPE can use its sequence's length
            rope = self.rotary.tables(paged.positions[:, None], paged.seq_lens)
        step = Step(True, paged.positions[None], rope, paged)
        for layer, block in enumerate(self.layers):
            h = block(h, cache.k[layer], cache.v[layer], step, cache.scale(layer))
        return h

    def logits(self, h):
        """h (..., H) -> fp32 logits (..., vocab_size)."""
        return self.lm_head(h if self.ln_f is None else self.ln_f(h)).float()
