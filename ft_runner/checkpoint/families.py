"""Per-family maps from a HuggingFace model to FT's layout: config keys and tensor names, as data.

Each family gives its config.ini section, a function from the HF config to FT's keys, and a map
from every FT tensor name of the layout table to a rule that builds it from the HF state dict
(`{i}` is the layer). Rules return FT orientation: [in, out] kernels, QKV as
[in, q heads + 2 * kv heads, head_dim] (see layout.QKV).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np

from ft_runner.config import ConfigError


class Source:
    """The HF state dict as fp32 numpy, with `{i}` in names filled with one layer's index."""

    def __init__(self, state: dict, hf, layer: int | None = None):
        self.state, self.hf, self.layer = state, hf, layer

    def name(self, template: str) -> str:
        return template.format(i=self.layer)

    def has(self, template: str) -> bool:
        return self.name(template) in self.state

    def get(self, template: str) -> np.ndarray:
        key = self.name(template)
        if key not in self.state:
            raise KeyError(f"the HF checkpoint has no tensor {key!r}")
        return self.state[key].float().numpy()


Rule = Callable[[Source], np.ndarray | None]


def same(name: str) -> Rule:
    return lambda src: src.get(name)


def linear(name: str) -> Rule:
    """torch.nn.Linear weight [out, in] -> FT kernel [in, out]."""
    return lambda src: src.get(name).T


def untied(name: str) -> Rule:
    """The LM head, or nothing when it is tied to the embedding (FT: no lm_head file)."""
    return lambda src: None if getattr(src.hf, "tie_word_embeddings", True) else src.get(name)


def norm(name: str, fill: float) -> Rule:
    """A layernorm parameter; ones / zeros where the model has no elementwise affine (OPT)."""
    def rule(src):
        if src.has(name):
            return src.get(name)
        return np.full(src.hf.hidden_size, fill, dtype=np.float32)
    return rule


def _heads(src: Source) -> tuple[int, int, int]:
    hf = src.hf
    heads = getattr(hf, "num_attention_heads", None) or hf.n_head
    kv = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return heads, kv, head_dim


def qkv_separate(q: str, k: str, v: str, bias: bool = False) -> Rule:
    """Separate q/k/v projections ([heads * head_dim, in] each) -> [in, q + 2 kv heads, head_dim]."""
    def rule(src):
        heads, kv, head_dim = _heads(src)
        stacked = np.concatenate([src.get(q), src.get(k), src.get(v)], axis=0)  # (out, in) or (out,)
        if bias:
            return stacked.reshape(heads + 2 * kv, head_dim)
        return stacked.T.reshape(stacked.shape[1], heads + 2 * kv, head_dim)
    return rule


def qkv_per_head(name: str, bias: bool = False) -> Rule:
    """A fused QKV whose output rows are [heads, 3, head_dim] (GPT-NeoX, BLOOM, Megatron v2+):
    permuted to FT's [3, heads, head_dim] before splitting."""
    def rule(src):
        heads, _, head_dim = _heads(src)
        w = src.get(name)
        if bias:
            return w.reshape(heads, 3, head_dim).transpose(1, 0, 2).reshape(3 * heads, head_dim)
        return w.reshape(heads, 3, head_dim, -1).transpose(3, 1, 0, 2).reshape(w.shape[1], 3 * heads, head_dim)
    return rule


def qkv_conv1d(name: str) -> Rule:
    """GPT-2's Conv1D c_attn, already [in, 3 * hidden] with q, k, v side by side."""
    def rule(src):
        heads, _, head_dim = _heads(src)
        w = src.get(name)
        return w.reshape(*w.shape[:-1], 3 * heads, head_dim)
    return rule


def _ln(prefix: str, fill_missing: bool = False) -> dict:
    """`{ft}.weight` / `{ft}.bias` entries for a layernorm at HF `prefix`, keyed by suffix."""
    if fill_missing:
        return {"weight": norm(prefix + ".weight", 1.0), "bias": norm(prefix + ".bias", 0.0)}
    return {"weight": same(prefix + ".weight"), "bias": same(prefix + ".bias")}


def _named(ft: str, hf_prefix: str, **kw) -> dict:
    return {f"{ft}.{k}": rule for k, rule in _ln(hf_prefix, **kw).items()}


# ---------------------------------------------------------------------------------------------
# HF config -> FT config.ini keys

ACTIVATIONS = {"gelu_new": "Gelu", "gelu_pytorch_tanh": "Gelu", "gelu_fast": "Gelu", "gelu": "GeluExact",
               "relu": "Relu", "silu": "Silu"}
GATED = {"silu": "SiGLU", "gelu_pytorch_tanh": "GeGLU"}


def _activation(name: str, table: dict = ACTIVATIONS) -> str:
    if name not in table:
        raise ConfigError(f"activation {name!r} is not supported; supported: {sorted(table)}")
    return table[name]


def _ids(hf) -> dict:
    def first(value):
        return value[0] if isinstance(value, (list, tuple)) else value

    bos, eos = first(hf.bos_token_id), first(hf.eos_token_id)
    end = eos if eos is not None else 0
    others = [i for i in dict.fromkeys(hf.eos_token_id) if i != end] if isinstance(hf.eos_token_id, (list, tuple)) else []
    return dict(start_id=bos if bos is not None else end, end_id=end, extra_end_ids=",".join(map(str, others)))


def _yarn(params: dict, max_pos: int) -> dict:
    """YaRN's parameters with HF's defaults filled in, and its cos/sin scale (`attention_factor`) resolved."""
    context = params.get("original_max_position_embeddings") or max_pos
    factor = float(params.get("factor") or max_pos / context)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": context,
            "beta_fast": float(params.get("beta_fast") or 32), "beta_slow": float(params.get("beta_slow") or 1),
            "truncate": bool(params.get("truncate", True)), "attention_factor": float(attention)}


def _rope(hf, head_dim: int, max_pos: int) -> dict:
    """FT keys for RoPE: rotary dims, theta, and the scaling as JSON (transformers 4 and 5 spellings)."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None) or getattr(hf, "rotary_emb_base", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None)
                         or getattr(hf, "rotary_pct", 1.0))
    keys = dict(rotary_embedding=int(head_dim * partial), rope_theta=float(theta), max_pos_seq_len=max_pos)
    if kind == "default":
        return keys
    if kind not in ("linear", "dynamic", "llama3", "yarn"):
        raise ConfigError(f"rope scaling {kind!r} is not supported; supported: linear, dynamic, llama3, yarn")
    if kind == "yarn":
        return dict(keys, rope_scaling=json.dumps(_yarn(params, max_pos), sort_keys=True))
    scaling = {"rope_type": kind, "factor": float(params["factor"])}
    if kind == "dynamic":  # extends the context: serve up to factor x the trained length
        scaling["original_max_position_embeddings"] = max_pos
        keys["max_pos_seq_len"] = int(max_pos * scaling["factor"])
    elif kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            scaling[key] = params[key]
    keys["rope_scaling"] = json.dumps(scaling, sort_keys=True)
    return keys


def gpt2_config(hf) -> dict:
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf, "scale_attn_weights", True):
        raise ConfigError("GPT-2 attention scaling variants (scale_attn_by_inverse_layer_idx, "
                          "scale_attn_weights=False) are not supported")
    return dict(head_num=hf.n_head, size_per_head=hf.n_embd // hf.n_head, inter_size=hf.n_inner or 4 * hf.n_embd,
                num_layer=hf.n_layer, vocab_size=hf.vocab_size, max_pos_seq_len=hf.n_positions,
                layernorm_eps=hf.layer_norm_epsilon, activation_type=_activation(hf.activation_function), **_ids(hf))


def gptj_config(hf) -> dict:
    head_dim = hf.n_embd // hf.n_head
    return dict(head_num=hf.n_head, size_per_head=head_dim, inter_size=hf.n_inner or 4 * hf.n_embd,
                num_layer=hf.n_layer, vocab_size=hf.vocab_size, max_pos_seq_len=hf.n_positions,
                layernorm_eps=hf.layer_norm_epsilon, activation_type=_activation(hf.activation_function),
                has_positional_encoding=False, rotary_embedding=hf.rotary_dim or head_dim, neox_rotary_style=False,
                use_gptj_residual=True, has_post_attention_layernorm=False, has_qkv_bias=False,
                has_attention_out_bias=False, has_lm_head_bias=True, **_ids(hf))


def neox_config(hf) -> dict:
    head_dim = hf.hidden_size // hf.num_attention_heads
    bias = getattr(hf, "attention_bias", True)
    return dict(head_num=hf.num_attention_heads, size_per_head=head_dim, inter_size=hf.intermediate_size,
                num_layer=hf.num_hidden_layers, vocab_size=hf.vocab_size, layernorm_eps=hf.layer_norm_eps,
                activation_type=_activation(hf.hidden_act), has_positional_encoding=False,
                use_gptj_residual=hf.use_parallel_residual, has_qkv_bias=bias, has_attention_out_bias=bias,
                **_rope(hf, head_dim, hf.max_position_embeddings), **_ids(hf))


def opt_config(hf) -> dict:
    bias = getattr(hf, "enable_bias", True)
    pre = hf.do_layer_norm_before
    return dict(head_num=hf.num_attention_heads, size_per_head=hf.hidden_size // hf.num_attention_heads,
                inter_size=hf.ffn_dim, num_layer=hf.num_hidden_layers, vocab_size=hf.vocab_size,
                max_pos_seq_len=hf.max_position_embeddings, layernorm_eps=1e-5,
                layernorm_type="pre_layernorm" if pre else "post_layernorm",
                activation_type=_activation(hf.activation_function),
                has_post_decoder_layernorm=pre and not getattr(hf, "_remove_final_layer_norm", False),
                has_qkv_bias=bias, has_attention_out_bias=bias, has_mlp_bias=bias, **_ids(hf))


def bloom_config(hf) -> dict:
    if hf.apply_residual_connection_post_layernorm:
        raise ConfigError("BLOOM with apply_residual_connection_post_layernorm=True is not supported")
    return dict(head_num=hf.n_head, size_per_head=hf.hidden_size // hf.n_head, inter_size=4 * hf.hidden_size,
                num_layer=hf.n_layer, vocab_size=hf.vocab_size,
                max_pos_seq_len=getattr(hf, "seq_length", None) or 2048,  # ALiBi: a serving limit only
                layernorm_eps=hf.layer_norm_epsilon, activation_type="Gelu", has_positional_encoding=False,
                has_pre_decoder_layernorm=True, use_attention_linear_bias=True, **_ids(hf))


def llama_config(hf) -> dict:
    """LLaMA, Mistral and Qwen2: RMSNorm, gated MLP, RoPE, grouped KV heads, optional sliding window."""
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    qwen2 = hf.model_type == "qwen2"
    attention_bias = getattr(hf, "attention_bias", False)
    return dict(head_num=heads, kv_head_num=getattr(hf, "num_key_value_heads", None) or heads,
                size_per_head=head_dim, hidden_units=0 if hf.hidden_size == heads * head_dim else hf.hidden_size,
                inter_size=hf.intermediate_size, num_layer=hf.num_hidden_layers, vocab_size=hf.vocab_size,
                layernorm_eps=hf.rms_norm_eps, norm_type="rmsnorm", activation_type=_activation(hf.hidden_act, GATED),
                has_positional_encoding=False, has_qkv_bias=qwen2 or attention_bias,
                has_attention_out_bias=attention_bias and not qwen2, has_mlp_bias=getattr(hf, "mlp_bias", False),
                **_window(hf), **_rope(hf, head_dim, hf.max_position_embeddings), **_ids(hf))


def _window(hf) -> dict:
    """Mistral: every layer has the window; Qwen2: the layers from `max_window_layers` on."""
    window = getattr(hf, "sliding_window", None) or 0
    types = getattr(hf, "layer_types", None)
    if not window or types is None:
        return dict(sliding_window=window)
    sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if not sliding:
        return dict(sliding_window=0)
    if sliding != list(range(sliding[0], len(types))):
        raise ConfigError(f"sliding-window layers {sliding} are not the last layers of the model: not supported")
    return dict(sliding_window=window, max_window_layers=sliding[0])


# ---------------------------------------------------------------------------------------------
# FT tensor name -> rule, per family

GPT2_TENSORS = {
    "wte": same("transformer.wte.weight"),
    "wpe": same("transformer.wpe.weight"),
    **_named("final_layernorm", "transformer.ln_f"),
    "lm_head.weight": untied("lm_head.weight"),
    **_named("layers.{i}.input_layernorm", "transformer.h.{i}.ln_1"),
    "layers.{i}.attention.query_key_value.weight": qkv_conv1d("transformer.h.{i}.attn.c_attn.weight"),
    "layers.{i}.attention.query_key_value.bias": qkv_conv1d("transformer.h.{i}.attn.c_attn.bias"),
    "layers.{i}.attention.dense.weight": same("transformer.h.{i}.attn.c_proj.weight"),  # Conv1D: [in, out]
    "layers.{i}.attention.dense.bias": same("transformer.h.{i}.attn.c_proj.bias"),
    **_named("layers.{i}.post_attention_layernorm", "transformer.h.{i}.ln_2"),
    "layers.{i}.mlp.dense_h_to_4h.weight": same("transformer.h.{i}.mlp.c_fc.weight"),
    "layers.{i}.mlp.dense_h_to_4h.bias": same("transformer.h.{i}.mlp.c_fc.bias"),
    "layers.{i}.mlp.dense_4h_to_h.weight": same("transformer.h.{i}.mlp.c_proj.weight"),
    "layers.{i}.mlp.dense_4h_to_h.bias": same("transformer.h.{i}.mlp.c_proj.bias"),
}

_GPTJ = "transformer.h.{i}."
GPTJ_TENSORS = {  # as FT's huggingface_gptj_ckpt_convert.py: QKV stacked to [in, 3, out]
    "wte": same("transformer.wte.weight"),
    **_named("final_layernorm", "transformer.ln_f"),
    "lm_head.weight": untied("lm_head.weight"),
    "lm_head.bias": same("lm_head.bias"),
    **_named("layers.{i}.input_layernorm", _GPTJ + "ln_1"),
    "layers.{i}.attention.query_key_value.weight": qkv_separate(
        _GPTJ + "attn.q_proj.weight", _GPTJ + "attn.k_proj.weight", _GPTJ + "attn.v_proj.weight"),
    "layers.{i}.attention.dense.weight": linear(_GPTJ + "attn.out_proj.weight"),
    "layers.{i}.mlp.dense_h_to_4h.weight": linear(_GPTJ + "mlp.fc_in.weight"),
    "layers.{i}.mlp.dense_h_to_4h.bias": same(_GPTJ + "mlp.fc_in.bias"),
    "layers.{i}.mlp.dense_4h_to_h.weight": linear(_GPTJ + "mlp.fc_out.weight"),
    "layers.{i}.mlp.dense_4h_to_h.bias": same(_GPTJ + "mlp.fc_out.bias"),
}

_NEOX = "gpt_neox.layers.{i}."
NEOX_TENSORS = {
    "wte": same("gpt_neox.embed_in.weight"),
    **_named("final_layernorm", "gpt_neox.final_layer_norm"),
    "lm_head.weight": untied("lm_head.weight"),
    **_named("layers.{i}.input_layernorm", _NEOX + "input_layernorm"),
    "layers.{i}.attention.query_key_value.weight": qkv_per_head(_NEOX + "attention.query_key_value.weight"),
    "layers.{i}.attention.query_key_value.bias": qkv_per_head(_NEOX + "attention.query_key_value.bias", bias=True),
    "layers.{i}.attention.dense.weight": linear(_NEOX + "attention.dense.weight"),
    "layers.{i}.attention.dense.bias": same(_NEOX + "attention.dense.bias"),
    **_named("layers.{i}.post_attention_layernorm", _NEOX + "post_attention_layernorm"),
    "layers.{i}.mlp.dense_h_to_4h.weight": linear(_NEOX + "mlp.dense_h_to_4h.weight"),
    "layers.{i}.mlp.dense_h_to_4h.bias": same(_NEOX + "mlp.dense_h_to_4h.bias"),
    "layers.{i}.mlp.dense_4h_to_h.weight": linear(_NEOX + "mlp.dense_4h_to_h.weight"),
    "layers.{i}.mlp.dense_4h_to_h.bias": same(_NEOX + "mlp.dense_4h_to_h.bias"),
}


def _opt_wte(src: Source) -> np.ndarray:
    """FT folds project_in into the embedding: E @ W_in^T, [V, hidden]."""
    table = src.get("model.decoder.embed_tokens.weight")
    if src.has("model.decoder.project_in.weight"):
        table = table @ src.get("model.decoder.project_in.weight").T
    return table


def _opt_lm_head(src: Source) -> np.ndarray | None:
    """FT folds project_out into the LM head: logits = project_out(h) E^T = h (E W_out)^T."""
    if src.has("model.decoder.project_out.weight"):
        return src.get("lm_head.weight") @ src.get("model.decoder.project_out.weight")
    return untied("lm_head.weight")(src)


_OPT = "model.decoder.layers.{i}."
OPT_TENSORS = {  # as FT's huggingface_opt_convert.py
    "wte": _opt_wte,
    "wpe": lambda src: src.get("model.decoder.embed_positions.weight")[2:],  # OPT offsets positions by 2
    **_named("final_layernorm", "model.decoder.final_layer_norm", fill_missing=True),
    "lm_head.weight": _opt_lm_head,
    **_named("layers.{i}.input_layernorm", _OPT + "self_attn_layer_norm", fill_missing=True),
    "layers.{i}.attention.query_key_value.weight": qkv_separate(
        _OPT + "self_attn.q_proj.weight", _OPT + "self_attn.k_proj.weight", _OPT + "self_attn.v_proj.weight"),
    "layers.{i}.attention.query_key_value.bias": qkv_separate(
        _OPT + "self_attn.q_proj.bias", _OPT + "self_attn.k_proj.bias", _OPT + "self_attn.v_proj.bias", bias=True),
    "layers.{i}.attention.dense.weight": linear(_OPT + "self_attn.out_proj.weight"),
    "layers.{i}.attention.dense.bias": same(_OPT + "self_attn.out_proj.bias"),
    **_named("layers.{i}.post_attention_layernorm", _OPT + "final_layer_norm", fill_missing=True),
    "layers.{i}.mlp.dense_h_to_4h.weight": linear(_OPT + "fc1.weight"),
    "layers.{i}.mlp.dense_h_to_4h.bias": same(_OPT + "fc1.bias"),
    "layers.{i}.mlp.dense_4h_to_h.weight": linear(_OPT + "fc2.weight"),
    "layers.{i}.mlp.dense_4h_to_h.bias": same(_OPT + "fc2.bias"),
}

_BLOOM = "transformer.h.{i}."
BLOOM_TENSORS = {  # as FT's huggingface_bloom_convert.py
    "wte": same("transformer.word_embeddings.weight"),
    **_named("pre_decoder_layernorm", "transformer.word_embeddings_layernorm"),
    **_named("final_layernorm", "transformer.ln_f"),
    "lm_head.weight": untied("lm_head.weight"),
    **_named("layers.{i}.input_layernorm", _BLOOM + "input_layernorm"),
    "layers.{i}.attention.query_key_value.weight": qkv_per_head(_BLOOM + "self_attention.query_key_value.weight"),
    "layers.{i}.attention.query_key_value.bias": qkv_per_head(_BLOOM + "self_attention.query_key_value.bias",
                                                              bias=True),
    "layers.{i}.attention.dense.weight": linear(_BLOOM + "self_attention.dense.weight"),
    "layers.{i}.attention.dense.bias": same(_BLOOM + "self_attention.dense.bias"),
    **_named("layers.{i}.post_attention_layernorm", _BLOOM + "post_attention_layernorm"),
    "layers.{i}.mlp.dense_h_to_4h.weight": linear(_BLOOM + "mlp.dense_h_to_4h.weight"),
    "layers.{i}.mlp.dense_h_to_4h.bias": same(_BLOOM + "mlp.dense_h_to_4h.bias"),
    "layers.{i}.mlp.dense_4h_to_h.weight": linear(_BLOOM + "mlp.dense_4h_to_h.weight"),
    "layers.{i}.mlp.dense_4h_to_h.bias": same(_BLOOM + "mlp.dense_4h_to_h.bias"),
}

_LLAMA = "model.layers.{i}."
LLAMA_TENSORS = {  # names as FT's community LLaMA forks wrote them
    "wte": same("model.embed_tokens.weight"),
    "final_layernorm.weight": same("model.norm.weight"),
    "lm_head.weight": untied("lm_head.weight"),
    "layers.{i}.input_layernorm.weight": same(_LLAMA + "input_layernorm.weight"),
    "layers.{i}.attention.query_key_value.weight": qkv_separate(
        _LLAMA + "self_attn.q_proj.weight", _LLAMA + "self_attn.k_proj.weight", _LLAMA + "self_attn.v_proj.weight"),
    "layers.{i}.attention.query_key_value.bias": qkv_separate(
        _LLAMA + "self_attn.q_proj.bias", _LLAMA + "self_attn.k_proj.bias", _LLAMA + "self_attn.v_proj.bias",
        bias=True),
    "layers.{i}.attention.dense.weight": linear(_LLAMA + "self_attn.o_proj.weight"),
    "layers.{i}.attention.dense.bias": same(_LLAMA + "self_attn.o_proj.bias"),
    "layers.{i}.post_attention_layernorm.weight": same(_LLAMA + "post_attention_layernorm.weight"),
    "layers.{i}.mlp.gate_proj.weight": linear(_LLAMA + "mlp.gate_proj.weight"),
    "layers.{i}.mlp.gate_proj.bias": same(_LLAMA + "mlp.gate_proj.bias"),
    "layers.{i}.mlp.up_proj.weight": linear(_LLAMA + "mlp.up_proj.weight"),
    "layers.{i}.mlp.up_proj.bias": same(_LLAMA + "mlp.up_proj.bias"),
    "layers.{i}.mlp.down_proj.weight": linear(_LLAMA + "mlp.down_proj.weight"),
    "layers.{i}.mlp.down_proj.bias": same(_LLAMA + "mlp.down_proj.bias"),
}


@dataclasses.dataclass(frozen=True)
class Family:
    section: str  # config.ini section
    config: Callable[..., dict]  # HF config -> FT config keys
    tensors: dict[str, Rule]  # FT tensor name (layout table) -> rule


LLAMA = Family("llama", llama_config, LLAMA_TENSORS)

# HF model_type -> family
FAMILIES = {
    "gpt2": Family("gpt", gpt2_config, GPT2_TENSORS),
    "gptj": Family("gptj", gptj_config, GPTJ_TENSORS),  # also KoGPT
    "gpt_neox": Family("gptneox", neox_config, NEOX_TENSORS),
    "opt": Family("gpt", opt_config, OPT_TENSORS),
    "bloom": Family("gpt", bloom_config, BLOOM_TENSORS),
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
}


def family_of(hf_config) -> Family:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        archs = getattr(hf_config, "architectures", None) or [model_type]
        raise ConfigError(
            f"architecture {archs[0]!r} (model_type {model_type!r}) is not supported; "
            f"supported model types: {sorted(FAMILIES)} and Megatron-LM checkpoint directories"
        )
    return FAMILIES[model_type]
