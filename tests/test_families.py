"""Model families (issue 3): GPT-J/KoGPT, GPT-NeoX, OPT, BLOOM, LLaMA/Mistral/Qwen2, Megatron-LM GPT.

Every family's tiny random model is checked against HF transformers under real mpirun ranks for
each TP x PP grid (one launch per grid checks them all), served end to end once per family, and
its converted files are checked against FT's layout.
"""

import argparse
import configparser
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import tiny_families
import torch
import transformers
from helpers import ROOT, Server, mpi_env, mpirun
from megatron_writer import write_megatron

from ft_runner.checkpoint import layout, megatron
from ft_runner.checkpoint.convert import convert
from ft_runner.checkpoint.load import read_config
from ft_runner.client import generate
from ft_runner.config import ConfigError, ModelConfig
from ft_runner.model.positional import Rotary, alibi_slopes, inv_freq

MODELS = [*tiny_families.CONFIGS, tiny_families.MEGATRON]


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """{name: model dir} for every family, their HF references in `refs/`, converted ones in `ft_models/`."""
    root = tmp_path_factory.mktemp("families")
    (root / "refs").mkdir()
    models = {}
    for name in MODELS:
        models[name], ref = tiny_families.build(name, root / "hf")
        np.savez(root / "refs" / f"{name}.npz", **ref)
    return root, models


# ---------------------------------------------------------------------------------------------
# parity with HF transformers under mpirun


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_every_family_matches_hf(families, tp, pp):
    root, models = families
    # The prefix cache's decisions are rank 0's, sent to every rank in each step's plan: TP=PP=1 and the
    # grid with both TP and PP cover them (the cache's runs are most of a grid's time, so only there).
    prefix = (tp, pp) in ((1, 1), (2, 2))
    cmd = mpirun(tp * pp, str(ROOT / "tests" / "parity_check.py"), "--model", *map(str, models.values()),
                 "--out", str(root / "ft_models"), "--tp", str(tp), "--pp", str(pp), "--refs", str(root / "refs"),
                 "--solo", "1", *([] if prefix else ["--no-prefix-cache-check"]))
    result = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    lines = {m.group(1): m.group(0) for m in re.finditer(r"PARITY model=(\S+) .*", output)}
    assert sorted(lines) == sorted(models), output
    failed = [line for line in lines.values() if "greedy_equal=True" not in line or "inflight_equal=True" not in line
              or "prefix_cache_equal=True" not in line or float(line.split("max_abs_diff=")[1].split()[0]) > 1e-4]
    missed = [name for name, line in lines.items() if "prefix_hits=0" in line and name != "llama_dynamic"]
    assert not (prefix and missed), output
    assert not failed and result.returncode == 0, output


# ---------------------------------------------------------------------------------------------
# served end to end: prompts in, text out, equal to HF's greedy continuation


@pytest.mark.parametrize("name,tp,pp", [("gptj", 2, 1), ("gpt_neox", 1, 2), ("opt_post_ln", 2, 1), ("bloom", 2, 1),
                                        ("qwen2", 2, 1), ("megatron", 2, 1)])
def test_server_text_equals_hf_greedy(families, name, tp, pp):
    root, models = families
    ref = np.load(root / "refs" / f"{name}.npz")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_families.reference_dir(models[name]))
    want = [tokenizer.decode(ref[f"greedy_{row}"], skip_special_tokens=True) for row in range(len(tiny_families.PROMPTS))]
    # tmp=root: the server reuses root/ft_models, where the parity test converted the model
    with Server(tp * pp, "--tp", str(tp), "--pp", str(pp), "--hf-model-name", str(models[name]), tmp=root) as server:
        result = generate(server.http_url, name, tiny_families.PROMPTS, tiny_families.NEW_TOKENS, timeout_s=120)
    assert [s.decode("utf-8") for s in result["sentences"].reshape(-1)] == want


# ---------------------------------------------------------------------------------------------
# FT's layout and config.ini


def _read(path, shape):
    return np.fromfile(path, dtype="<f4").reshape(shape)


def test_gptj_files_are_ft_gptj_layout(families, tmp_path):
    """As FT's huggingface_gptj_ckpt_convert.py: [gptj] with rotary_embedding, no wpe, no QKV or attention-output
    bias, no post-attention layernorm, lm_head with a bias, QKV stacked [in, 3, out] and split on the last axis."""
    ckpt = convert(families[1]["gptj"], tmp_path, tp=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(families[1]["gptj"], dtype=torch.float32).state_dict()
    H, V = 48, 1027
    ini = configparser.ConfigParser()
    ini.read(ckpt / "config.ini")
    assert ini.sections() == ["gptj"] and ini["gptj"]["rotary_embedding"] == "8"
    files = set(os.listdir(ckpt))
    for absent in ("model.wpe.bin", "model.layers.0.attention.query_key_value.bias.0.bin",
                   "model.layers.0.attention.dense.bias.bin", "model.layers.0.post_attention_layernorm.weight.bin"):
        assert absent not in files
    np.testing.assert_array_equal(_read(ckpt / "model.lm_head.bias.bin", (V,)), hf["lm_head.bias"].numpy())
    np.testing.assert_array_equal(_read(ckpt / "model.lm_head.weight.bin", (V, H)), hf["lm_head.weight"].numpy())
    p = "transformer.h.1.attn."
    qkv = torch.stack([hf[p + "q_proj.weight"], hf[p + "k_proj.weight"], hf[p + "v_proj.weight"]])  # [3, out, in]
    ft = qkv.permute(2, 0, 1).numpy()  # [in, 3, out]
    for r in range(2):
        piece = _read(ckpt / f"model.layers.1.attention.query_key_value.weight.{r}.bin", (H, 3, H // 2))
        np.testing.assert_array_equal(piece, ft[..., r * H // 2:(r + 1) * H // 2])
    dense = np.concatenate([_read(ckpt / f"model.layers.1.attention.dense.weight.{r}.bin", (H // 2, H))
                            for r in range(2)])
    np.testing.assert_array_equal(dense, hf[p + "out_proj.weight"].numpy().T)


def test_neox_and_bloom_qkv_is_permuted_from_per_head(families, tmp_path):
    """HF fuses QKV per head ([heads, 3, head_dim]); FT's file is [in, 3, heads * head_dim] split per rank."""
    for name, prefix in (("gpt_neox", "gpt_neox.layers.0.attention."), ("bloom", "transformer.h.0.self_attention.")):
        model_dir = families[1][name]
        ckpt = convert(model_dir, tmp_path / name, tp=2)
        config, _ = read_config(ckpt)
        heads, hd, H = config.head_num, config.size_per_head, config.hidden_size
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
        w = hf[prefix + "query_key_value.weight"].numpy().reshape(heads, 3, hd, H)
        q0 = w[: heads // 2, 0].reshape(-1, H).T  # rank 0's query columns: its heads' q rows
        piece = _read(ckpt / "model.layers.0.attention.query_key_value.weight.0.bin", (H, 3, heads // 2 * hd))
        np.testing.assert_array_equal(piece[:, 0], q0)
        v1 = w[heads // 2:, 2].reshape(-1, H).T
        piece = _read(ckpt / "model.layers.0.attention.query_key_value.weight.1.bin", (H, 3, heads // 2 * hd))
        np.testing.assert_array_equal(piece[:, 2], v1)


def test_opt_folds_projections_and_offsets_positions(families, tmp_path):
    """As FT's huggingface_opt_convert.py: wte = E W_in^T, lm_head = E W_out, wpe without OPT's 2 offset rows."""
    model_dir = families[1]["opt_post_ln"]
    ckpt = convert(model_dir, tmp_path, tp=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    E = hf["model.decoder.embed_tokens.weight"].numpy()
    np.testing.assert_allclose(_read(ckpt / "model.wte.bin", (1027, 48)),
                               E @ hf["model.decoder.project_in.weight"].numpy().T, rtol=1e-6)
    np.testing.assert_allclose(_read(ckpt / "model.lm_head.weight.bin", (1027, 48)),
                               E @ hf["model.decoder.project_out.weight"].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(_read(ckpt / "model.wpe.bin", (128, 48)),
                                  hf["model.decoder.embed_positions.weight"].numpy()[2:])
    gpt = configparser.ConfigParser()
    gpt.read(ckpt / "config.ini")
    assert (gpt["gpt"]["layernorm_type"], gpt["gpt"]["activation_type"], gpt["gpt"]["has_post_decoder_layernorm"]) \
        == ("post_layernorm", "Relu", "0")
    assert "model.final_layernorm.weight.bin" not in os.listdir(ckpt)


def test_bloom_config_keys(families, tmp_path):
    ckpt = convert(families[1]["bloom"], tmp_path, tp=2)
    gpt = configparser.ConfigParser()
    gpt.read(ckpt / "config.ini")
    keys = {k: gpt["gpt"][k] for k in ("use_attention_linear_bias", "has_pre_decoder_layernorm",
                                       "has_positional_encoding", "activation_type")}
    assert keys == {"use_attention_linear_bias": "1", "has_pre_decoder_layernorm": "1",
                    "has_positional_encoding": "0", "activation_type": "Gelu"}
    assert {"model.pre_decoder_layernorm.weight.bin", "model.pre_decoder_layernorm.bias.bin"} <= set(os.listdir(ckpt))


def test_grouped_kv_heads_are_replicated_to_the_ranks_that_read_them(families, tmp_path):
    """LLaMA with 4 query heads and 1 KV head at TP=2: each rank's file holds its 2 query heads and a copy of the KV head."""
    model_dir = families[1]["llama"]
    ckpt = convert(model_dir, tmp_path, tp=2)
    ini = configparser.ConfigParser()
    ini.read(ckpt / "config.ini")
    assert ini.sections() == ["llama"] and ini["llama"]["kv_head_num"] == "1"
    assert "model.lm_head.weight.bin" in os.listdir(ckpt), "untied LM head"
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    p = "model.layers.2.self_attn."
    q, k, v = (hf[p + f"{x}_proj.weight"].numpy().T.reshape(48, -1, 12) for x in "qkv")  # [in, heads, head_dim]
    for r in range(2):
        piece = _read(ckpt / f"model.layers.2.attention.query_key_value.weight.{r}.bin", (48, 4, 12))
        np.testing.assert_array_equal(piece, np.concatenate([q[:, 2 * r:2 * r + 2], k, v], axis=1))


def test_tied_llama_writes_no_lm_head(families, tmp_path):
    ckpt = convert(families[1]["qwen2"], tmp_path, tp=1)
    files = set(os.listdir(ckpt))
    assert "model.lm_head.weight.bin" not in files
    assert "model.layers.0.attention.query_key_value.bias.0.bin" in files, "Qwen2 has a QKV bias"
    assert "model.layers.0.attention.dense.bias.bin" not in files
    assert "model.layers.0.input_layernorm.bias.bin" not in files, "RMSNorm has no bias"
    config, _ = read_config(ckpt)
    assert (config.sliding_window, config.max_window_layers, config.norm_type, config.activation_type) == \
        (6, 2, "rmsnorm", "SiGLU")


@pytest.mark.parametrize("heads,kv,tp", [(8, 8, 2), (8, 2, 2), (8, 2, 4), (8, 1, 4), (8, 4, 8), (8, 2, 8)])
def test_qkv_split_then_join_is_the_identity(heads, kv, tp):
    config = ModelConfig(head_num=heads, kv_head_num=kv, size_per_head=3, inter_size=16, num_layer=1, vocab_size=8,
                         max_pos_seq_len=4, start_id=0, end_id=0)
    whole = np.random.default_rng(0).normal(size=(5, heads + 2 * kv, 3))
    pieces = layout.QKV().split(whole, tp, config)
    assert [p.shape for p in pieces] == [layout.QKV().piece_shape(whole.shape, tp, config)] * tp
    for r, piece in enumerate(pieces):  # rank r's query heads read the KV head(s) in its piece
        group = heads // kv
        wanted_kv = sorted({h // group for h in range(r * heads // tp, (r + 1) * heads // tp)})
        np.testing.assert_array_equal(piece[:, heads // tp:heads // tp + len(wanted_kv)], whole[:, heads + np.array(wanted_kv)])
    np.testing.assert_array_equal(layout.QKV().join(pieces, config), whole)


def test_a_checkpoint_split_for_one_tp_loads_under_another(families, tmp_path):
    """The loader joins and re-splits: a TP=2 LLaMA directory (KV head replicated) read whole equals the TP=1 one."""
    model_dir = families[1]["llama"]
    one, two = convert(model_dir, tmp_path / "a", tp=1), convert(model_dir, tmp_path / "b", tp=2)
    config, _ = read_config(one)
    spec = next(s for s in layout.LAYER_TENSORS if s.name.endswith("query_key_value.weight"))
    np.testing.assert_array_equal(layout.read_tensor(two, spec, 3, config, 2), layout.read_tensor(one, spec, 3, config, 1))


def test_ft_written_gptj_config_takes_gptj_defaults(tmp_path):
    """FT's GPT-J converter writes only its own keys (no max_pos_seq_len, no variant flags)."""
    (tmp_path / "config.ini").write_text(
        "[gptj]\nmodel_name = gptj\nhead_num = 16\nsize_per_head = 256\ninter_size = 16384\nnum_layer = 28\n"
        "rotary_embedding = 64\nvocab_size = 50400\nstart_id = 50256\nend_id = 50256\nweight_data_type = fp32\n")
    config = ModelConfig.from_ini(tmp_path / "config.ini")
    assert (config.use_gptj_residual, config.has_post_attention_layernorm, config.has_qkv_bias,
            config.has_attention_out_bias, config.has_lm_head_bias, config.has_positional_encoding,
            config.neox_rotary_style, config.rotary_embedding) == (True, False, False, False, True, False, False, 64)


def test_config_ini_round_trips_every_section(families, tmp_path):
    for name in ("gptj", "gpt_neox", "llama", "llama_dynamic", "bloom"):
        ckpt = convert(families[1][name], tmp_path / name, tp=1)
        config, _ = read_config(ckpt)
        config.to_ini(tmp_path / "again.ini", _section(ckpt / "config.ini"))
        assert ModelConfig.from_ini(tmp_path / "again.ini") == config


def _section(path):
    ini = configparser.ConfigParser()
    ini.read(path)
    return ini.sections()[0]


# ---------------------------------------------------------------------------------------------
# positions: independent of transformers' own implementation where it matters


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 1000000.0},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
     "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 0.707, "truncate": False},
])
def test_rope_frequencies_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=2048,
                                  rope_parameters=dict(rope))
    from ft_runner.checkpoint.families import llama_config

    config = ModelConfig(**llama_config(hf), model_name="x")
    kind = rope["rope_type"]
    if kind == "default":
        want = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
        torch.testing.assert_close(inv_freq(config), want, rtol=1e-6, atol=0)
    elif kind == "dynamic":
        for seq_len in (100, 2048, 3000):
            want, _ = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=torch.tensor(seq_len))
            torch.testing.assert_close(inv_freq(config, torch.tensor([seq_len]))[0], want, rtol=1e-6, atol=0)
        assert config.max_pos_seq_len == 4096
    else:
        want, scale = ROPE_INIT_FUNCTIONS[kind](hf, None)
        torch.testing.assert_close(inv_freq(config), want, rtol=1e-6, atol=0)
        assert Rotary(config).scale == pytest.approx(scale, rel=1e-12)


def test_alibi_slopes():
    """Press et al.: 2^(-8 k / n) for n a power of two; otherwise the next power's odd terms fill in."""
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** (-k) for k in range(1, 9)]))
    six = [2.0 ** (-2 * k) for k in range(1, 5)] + [2.0 ** (-k) for k in (1, 3)]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(six))


# ---------------------------------------------------------------------------------------------
# Megatron-LM


def test_megatron_training_grid_does_not_matter(families, tmp_path):
    """Shards trained at TP=2 and at TP=1 x PP=2 (mp_rank_XX_YYY, layers renumbered) convert to the same files;
    the vocabulary padding is dropped."""
    hf_dir = tiny_families.reference_dir(families[1]["megatron"])
    a = convert(write_megatron(hf_dir, tmp_path / "tp2", tp=2), tmp_path / "a", tp=2)
    b = convert(write_megatron(hf_dir, tmp_path / "pp2", tp=1, pp=2), tmp_path / "b", tp=2)
    assert sorted(os.listdir(tmp_path / "pp2")) == ["gpt2-merges.txt", "gpt2-vocab.json", "mp_rank_00_000",
                                                   "mp_rank_00_001"]
    for f in os.listdir(a):
        if f.startswith("model."):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    np.testing.assert_array_equal(_read(a / "model.wte.bin", (1024, 48)), hf["transformer.wte.weight"].numpy())
    assert read_config(a)[0].vocab_size == 1024


def test_megatron_shards_load_with_weights_only(families, tmp_path):
    """The args Namespace is allowed; anything else that needs unpickling code is refused, not executed."""
    shard = megatron.shard_files(families[1]["megatron"])[0, 0]
    assert isinstance(megatron.load_shard(shard)["args"], argparse.Namespace)
    bad = tmp_path / "mp_rank_00"
    bad.mkdir()
    torch.save({"model": {}, "args": argparse.Namespace(), "hook": os.getcwd, "checkpoint_version": 3.0},
               bad / "model_optim_rng.pt")
    with pytest.raises(ConfigError, match="weights_only"):
        megatron.load_shard(bad / "model_optim_rng.pt")


def test_megatron_without_bpe_files_says_what_it_needs(families, tmp_path):
    shutil.copytree(families[1]["megatron"], tmp_path / "m", ignore=shutil.ignore_patterns("*.json", "*.txt"))
    with pytest.raises(ConfigError, match="vocab.json or gpt2-vocab.json"):
        convert(tmp_path / "m", tmp_path / "out", tp=1)


# ---------------------------------------------------------------------------------------------
# refusals


def test_unsupported_family_names_the_supported_ones(tmp_path):
    cfg = transformers.GPTBigCodeConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    transformers.GPTBigCodeForCausalLM(cfg).save_pretrained(tmp_path / "bigcode")
    with pytest.raises(ConfigError, match=r"'GPTBigCodeForCausalLM'.*not supported.*bloom.*gptj.*llama.*Megatron"):
        convert(tmp_path / "bigcode", tmp_path / "out", tp=1)


def test_tp_that_cannot_share_kv_heads_is_refused():
    config = ModelConfig(head_num=6, kv_head_num=3, size_per_head=4, inter_size=8, num_layer=1, vocab_size=8,
                         max_pos_seq_len=4, start_id=0, end_id=0)
    with pytest.raises(ConfigError, match="--tp 2 and the model's 3 KV heads"):
        config.check_tp(2)


def test_unsupported_rope_scaling_is_refused(tmp_path):
    from ft_runner.checkpoint.families import llama_config

    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16, "rope_theta": 10000.0,
        "original_max_position_embeddings": 2048})
    with pytest.raises(ConfigError, match="rope scaling 'longrope' is not supported"):
        llama_config(hf)
