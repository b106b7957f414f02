"""Tiny random models of every supported family, and HF transformers' answers for them.

Sizes are odd on purpose: vocabularies not divisible by TP, fewer KV heads than TP ranks, a head
count that is not a power of two (ALiBi), partial rotary, a head_dim * heads wider than hidden.
Weights are drawn with a large std so greedy continuations vary; `reference` checks that no greedy
step is a near-tie, so equal tokens really mean equal models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from helpers import TOKENIZER_DIR

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "a", "The class statement defines a new class"]
NEW_TOKENS = 32
MIN_MARGIN = 1e-3  # smallest allowed gap between the best and second-best logit on a greedy step

_SMALL = dict(vocab_size=1027, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=80,
              max_position_embeddings=128)
_LLAMA = dict(_SMALL, bos_token_id=0, eos_token_id=0)

# name -> (config class, kwargs); every name is one model directory
CONFIGS = {
    "gptj": (transformers.GPTJConfig, dict(vocab_size=1027, n_positions=128, n_embd=48, n_layer=4, n_head=4,
                                           rotary_dim=8, bos_token_id=0, eos_token_id=0)),
    # KoGPT: the same architecture, another vocabulary and special ids, rotary over the whole head
    "kogpt": (transformers.GPTJConfig, dict(vocab_size=1100, n_positions=128, n_embd=48, n_layer=2, n_head=4,
                                            rotary_dim=12, bos_token_id=0, eos_token_id=1, pad_token_id=3)),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(_SMALL, rotary_pct=0.5, use_parallel_residual=True,
                                                  hidden_act="gelu", bos_token_id=0, eos_token_id=0)),
    "gpt_neox_sequential": (transformers.GPTNeoXConfig, dict(
        _SMALL, rotary_pct=1.0, use_parallel_residual=False, hidden_act="gelu", bos_token_id=0, eos_token_id=0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "opt": (transformers.OPTConfig, dict(vocab_size=1027, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                                         ffn_dim=96, max_position_embeddings=128, do_layer_norm_before=True,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    # OPT-350m: layernorm after the residual adds, no final layernorm, embeddings projected in and out
    "opt_post_ln": (transformers.OPTConfig, dict(vocab_size=1027, hidden_size=48, num_hidden_layers=4,
                                                 num_attention_heads=4, ffn_dim=96, max_position_embeddings=128,
                                                 do_layer_norm_before=False, word_embed_proj_dim=32,
                                                 bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    "bloom": (transformers.BloomConfig, dict(vocab_size=1027, hidden_size=48, n_layer=4, n_head=6,
                                             bos_token_id=0, eos_token_id=0)),
    # 4 query heads share 1 KV head: under TP=2 both ranks hold a copy of it
    "llama": (transformers.LlamaConfig, dict(_LLAMA, num_key_value_heads=1, tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                              "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 32})),
    "llama_tied_bias": (transformers.LlamaConfig, dict(_LLAMA, num_key_value_heads=2, tie_word_embeddings=True,
                                                       attention_bias=True, mlp_bias=True,
                                                       rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                        "rope_theta": 500000.0, "beta_fast": 16,
                                                                        "original_max_position_embeddings": 16})),
    # dynamic NTK from position 16 on; 4 heads of 16 dims over a 48-wide residual
    "llama_dynamic": (transformers.LlamaConfig, dict(_LLAMA, head_dim=16, max_position_embeddings=16,
                                                     rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                      "rope_theta": 10000.0})),
    "mistral": (transformers.MistralConfig, dict(_LLAMA, num_key_value_heads=2, sliding_window=6)),
    # Qwen2.5's long-context setting: YaRN over a trained context of 32
    "qwen2": (transformers.Qwen2Config, dict(_LLAMA, num_key_value_heads=1, use_sliding_window=True,
                                             sliding_window=6, max_window_layers=2, tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                              "original_max_position_embeddings": 32})),
}
MEGATRON = "megatron"


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights N(0, 0.3), biases N(0, 0.05), norm gains 1 + N(0, 0.1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif "norm" in name or ".ln" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(1.0, 0.1) if name.endswith("weight") else p.normal_(0, 0.05)
            else:
                p.normal_(0, 0.05)


class NearTie(AssertionError):
    pass


def build(name: str, root: Path) -> tuple[Path, dict]:
    """Make the model and its reference, trying further seeds while a greedy step is a near-tie."""
    for seed in range(10):
        path = make(name, Path(root) / f"seed{seed}", seed)
        try:
            return path, reference(path)
        except NearTie:
            continue
    raise AssertionError(f"{name}: every seed gives a near-tie")


def make(name: str, root: Path, seed: int = 0) -> Path:
    """Save the tiny `name` model with the embedded tokenizer under root/name."""
    path = Path(root) / name
    if name == MEGATRON:
        return make_megatron(path, seed=seed)
    cls, kwargs = CONFIGS[name]
    model = transformers.AutoModelForCausalLM.from_config(cls(**kwargs)).eval()
    randomise(model, seed)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def make_megatron(path: Path, tp: int = 2, pp: int = 1, seed: int = 0) -> Path:
    """A Megatron-LM GPT checkpoint (checkpoint_version 3, TP x PP shards) of a tiny random GPT-2;
    the GPT-2 itself is saved next to it (`<path>-hf`) as the reference."""
    from megatron_writer import write_megatron

    hf_dir = Path(f"{path}-hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=48, n_layer=4, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomise(model, seed)
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    write_megatron(hf_dir, path, tp, pp)
    return path


def reference_dir(model_dir: Path) -> Path:
    """The HF model that is the reference for a model directory (a Megatron one's GPT-2 source)."""
    hf = Path(f"{model_dir}-hf")
    return hf if hf.exists() else Path(model_dir)


def reference(model_dir: Path, new_tokens: int = NEW_TOKENS) -> dict:
    """HF transformers: prompt logits and the greedy continuation of every prompt, one at a time."""
    hf_dir = reference_dir(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    out = {}
    for row, text in enumerate(PROMPTS):
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=eos,
                                 output_scores=True, return_dict_in_generate=True)
        top2 = torch.stack([s[0].topk(2).values for s in gen.scores])
        margin = float((top2[:, 0] - top2[:, 1]).min())
        if margin < MIN_MARGIN:
            raise NearTie(f"{model_dir.name}: prompt {row} has a near-tie ({margin:.1e})")
        out[f"prompt_{row}"] = np.array(ids)
        out[f"logits_{row}"] = logits
        out[f"greedy_{row}"] = gen.sequences[0].numpy()
    return out


def main() -> None:
    """`python tiny_families.py --out DIR`: build every model and its reference (DIR/refs/<name>.npz)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    for name in args.only or [*CONFIGS, MEGATRON]:
        path, ref = build(name, args.out)
        (args.out / "refs").mkdir(parents=True, exist_ok=True)
        np.savez(args.out / "refs" / f"{name}.npz", **ref)
        greedy = [ref[f"greedy_{r}"][len(ref[f"prompt_{r}"]):].tolist() for r in range(len(PROMPTS))]
        print(path, json.dumps({"distinct_new_tokens": len({t for g in greedy for t in g}),
                                "lengths": [len(g) for g in greedy]}))


if __name__ == "__main__":
    main()
