"""Per-family maps from a HuggingFace state dict to FT's tensor names (FT orientation, fp32 numpy)."""

from __future__ import annotations

import numpy as np

from ft_runner.config import ConfigError, ModelConfig

ACTIVATIONS = {"gelu_new": "Gelu", "gelu_pytorch_tanh": "Gelu", "gelu": "Gelu", "relu": "Relu"}


def gpt2_config(hf, weight_data_type: str, tp: int, name: str) -> ModelConfig:
    if hf.activation_function not in ACTIVATIONS:
        raise ConfigError(f"GPT-2 activation {hf.activation_function!r} is not supported")
    return ModelConfig(
        model_name=name,
        head_num=hf.n_head,
        size_per_head=hf.n_embd // hf.n_head,
        inter_size=hf.n_inner or 4 * hf.n_embd,
        num_layer=hf.n_layer,
        vocab_size=hf.vocab_size,
        max_pos_seq_len=hf.n_positions,
        start_id=hf.bos_token_id if hf.bos_token_id is not None else 0,
        end_id=hf.eos_token_id if hf.eos_token_id is not None else 0,
        weight_data_type=weight_data_type,
        tensor_para_size=tp,
        layernorm_eps=hf.layer_norm_epsilon,
        activation_type=ACTIVATIONS[hf.activation_function],
    )


def gpt2_tensors(state: dict, config: ModelConfig, tied: bool) -> dict[str, np.ndarray]:
    """HF GPT-2 (Conv1D kernels are already [in, out]) -> {FT name: array}."""
    h = config.hidden_size

    def get(key):
        for prefix in ("transformer.", ""):
            if prefix + key in state:
                return state[prefix + key].float().numpy()
        raise KeyError(f"HF checkpoint has no tensor {key!r}")

    out = {
        "wte": get("wte.weight"),
        "wpe": get("wpe.weight"),
        "final_layernorm.weight": get("ln_f.weight"),
        "final_layernorm.bias": get("ln_f.bias"),
    }
    if not tied:
        out["lm_head.weight"] = state["lm_head.weight"].float().numpy()
    for i in range(config.num_layer):
        p, q = f"h.{i}.", f"layers.{i}."
        out[q + "input_layernorm.weight"] = get(p + "ln_1.weight")
        out[q + "input_layernorm.bias"] = get(p + "ln_1.bias")
        out[q + "attention.query_key_value.weight"] = get(p + "attn.c_attn.weight").reshape(h, 3, h)
        out[q + "attention.query_key_value.bias"] = get(p + "attn.c_attn.bias").reshape(3, h)
        out[q + "attention.dense.weight"] = get(p + "attn.c_proj.weight")
        out[q + "attention.dense.bias"] = get(p + "attn.c_proj.bias")
        out[q + "post_attention_layernorm.weight"] = get(p + "ln_2.weight")
        out[q + "post_attention_layernorm.bias"] = get(p + "ln_2.bias")
        out[q + "mlp.dense_h_to_4h.weight"] = get(p + "mlp.c_fc.weight")
        out[q + "mlp.dense_h_to_4h.bias"] = get(p + "mlp.c_fc.bias")
        out[q + "mlp.dense_4h_to_h.weight"] = get(p + "mlp.c_proj.weight")
        out[q + "mlp.dense_4h_to_h.bias"] = get(p + "mlp.c_proj.bias")
    return out


# model_type in the HF config -> (config builder, tensor map)
FAMILIES = {"gpt2": (gpt2_config, gpt2_tensors)}


def family_of(hf_config):
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        archs = getattr(hf_config, "architectures", None) or [model_type]
        raise ConfigError(
            f"architecture {archs[0]!r} (model_type {model_type!r}) is not supported; "
            f"supported model types: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]
