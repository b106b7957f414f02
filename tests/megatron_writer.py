"""Write a Megatron-LM GPT checkpoint from a HF GPT-2, as Megatron-LM lays its shards out.

`<out>/mp_rank_XX/model_optim_rng.pt` (or `mp_rank_XX_YYY` with pipeline stages), checkpoint_version 3:
Linear weights [out, in]; QKV rows interleaved per head as [heads, 3, head_dim]; column-parallel
weights split on rows, row-parallel ones on columns, the vocabulary padded to a multiple of
N x TP and split on rows; the training args as an argparse.Namespace. Plus the GPT-2 BPE files
(`gpt2-vocab.json`, `gpt2-merges.txt`) taken from the HF tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers


def _bpe_files(hf_dir: Path, out: Path) -> None:
    model = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (out / "gpt2-vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "gpt2-merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _layer(state: dict, i: int, heads: int, tp: int, r: int) -> dict:
    """Rank r's tensors of layer i (HF Conv1D kernels are [in, out]: transpose to Linear's [out, in])."""
    p = f"transformer.h.{i}."
    hidden = state[p + "ln_1.weight"].shape[0]
    head_dim, local = hidden // heads, heads // tp

    def qkv(t):  # [3, heads, head_dim, ...] -> this rank's heads as [local, 3, head_dim, ...] rows
        t = t.reshape(3, heads, head_dim, *t.shape[1:])[:, r * local:(r + 1) * local]
        return t.transpose(0, 1).reshape(local * 3 * head_dim, *t.shape[3:])

    def rows(t):
        return t.chunk(tp, dim=0)[r]

    def cols(t):
        return t.chunk(tp, dim=1)[r]

    return {
        "input_layernorm.weight": state[p + "ln_1.weight"], "input_layernorm.bias": state[p + "ln_1.bias"],
        "self_attention.query_key_value.weight": qkv(state[p + "attn.c_attn.weight"].T),
        "self_attention.query_key_value.bias": qkv(state[p + "attn.c_attn.bias"]),
        "self_attention.dense.weight": cols(state[p + "attn.c_proj.weight"].T),
        "self_attention.dense.bias": state[p + "attn.c_proj.bias"],
        "post_attention_layernorm.weight": state[p + "ln_2.weight"],
        "post_attention_layernorm.bias": state[p + "ln_2.bias"],
        "mlp.dense_h_to_4h.weight": rows(state[p + "mlp.c_fc.weight"].T),
        "mlp.dense_h_to_4h.bias": rows(state[p + "mlp.c_fc.bias"]),
        "mlp.dense_4h_to_h.weight": cols(state[p + "mlp.c_proj.weight"].T),
        "mlp.dense_4h_to_h.bias": state[p + "mlp.c_proj.bias"],
    }


def write_megatron(hf_dir: Path, out: Path, tp: int = 2, pp: int = 1, divisible_by: int = 96) -> Path:
    """`divisible_by` is Megatron's --make-vocab-size-divisible-by (128 there; 96 gives the tiny vocabulary padding)."""
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32)
    cfg, state = model.config, {k: v.clone() for k, v in model.state_dict().items()}
    padded = -(-cfg.vocab_size // (divisible_by * tp)) * divisible_by * tp
    torch.manual_seed(1)  # padding rows: never real tokens
    wte = torch.cat([state["transformer.wte.weight"], torch.randn(padded - cfg.vocab_size, cfg.n_embd)])
    args = argparse.Namespace(num_layers=cfg.n_layer, hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head,
                              ffn_hidden_size=4 * cfg.n_embd, max_position_embeddings=cfg.n_positions,
                              padded_vocab_size=padded, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, layernorm_epsilon=cfg.layer_norm_epsilon,
                              bias_gelu_fusion=True, openai_gelu=False, tokenizer_type="GPT2BPETokenizer")
    per_stage = cfg.n_layer // pp
    out.mkdir(parents=True)
    for stage in range(pp):
        for r in range(tp):
            encoder = {}
            for local in range(per_stage):
                for name, t in _layer(state, stage * per_stage + local, cfg.n_head, tp, r).items():
                    encoder[f"layers.{local}.{name}"] = t.contiguous()
            language_model = {"encoder": encoder}
            if stage == 0:
                language_model["embedding"] = {
                    "word_embeddings": {"weight": wte.chunk(tp, dim=0)[r].contiguous()},
                    "position_embeddings": {"weight": state["transformer.wpe.weight"]}}
            if stage == pp - 1:
                encoder["final_layernorm.weight"] = state["transformer.ln_f.weight"]
                encoder["final_layernorm.bias"] = state["transformer.ln_f.bias"]
            shard = out / (f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{stage:03d}")
            shard.mkdir()
            torch.save({"model": {"language_model": language_model}, "checkpoint_version": 3.0, "args": args,
                        "iteration": 1000}, shard / "model_optim_rng.pt")
    _bpe_files(Path(hf_dir), out)
    return out
