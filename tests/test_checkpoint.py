"""The converter writes FT's layout exactly; the loader reads ours and FT's own."""

import configparser
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from ft_runner.checkpoint import layout
from ft_runner.checkpoint.convert import convert
from ft_runner.config import ConfigError, ModelConfig

H, L, V, P, I = 48, 4, 1027, 128, 192  # noqa: E741  (the tiny_gpt2 fixture's shape)


def _hf_state(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype,itemsize", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_names_shapes_and_dtypes_match_the_spec(tiny_gpt2, tmp_path, dtype, itemsize):
    ckpt = convert(tiny_gpt2, tmp_path, tp=2, weight_data_type=dtype)
    assert ckpt == tmp_path / "2-gpu"
    expected = {
        "model.wte.bin": V * H, "model.wpe.bin": P * H,
        "model.final_layernorm.weight.bin": H, "model.final_layernorm.bias.bin": H,
    }
    for i in range(L):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight.bin": H, p + "input_layernorm.bias.bin": H,
            p + "attention.dense.bias.bin": H, p + "post_attention_layernorm.weight.bin": H,
            p + "post_attention_layernorm.bias.bin": H, p + "mlp.dense_4h_to_h.bias.bin": H,
        })
        for r in range(2):
            expected.update({
                p + f"attention.query_key_value.weight.{r}.bin": H * 3 * H // 2,
                p + f"attention.query_key_value.bias.{r}.bin": 3 * H // 2,
                p + f"attention.dense.weight.{r}.bin": H // 2 * H,
                p + f"mlp.dense_h_to_4h.weight.{r}.bin": H * I // 2,
                p + f"mlp.dense_h_to_4h.bias.{r}.bin": I // 2,
                p + f"mlp.dense_4h_to_h.weight.{r}.bin": I // 2 * H,
            })
    files = {f for f in os.listdir(ckpt) if f.startswith("model.")}
    assert files == set(expected), "GPT-2 is tied: no lm_head file, nothing else"
    for name, count in expected.items():
        assert (ckpt / name).stat().st_size == count * itemsize, name
    ini = configparser.ConfigParser()
    ini.read(ckpt / "config.ini")
    gpt = ini["gpt"]
    assert (gpt["head_num"], gpt["size_per_head"], gpt["inter_size"], gpt["num_layer"]) == ("4", "12", "192", "4")
    assert (gpt["vocab_size"], gpt["max_pos_seq_len"], gpt["weight_data_type"]) == (str(V), str(P), dtype)
    assert gpt["tensor_para_size"] == "2" and gpt["end_id"] == gpt["start_id"]
    assert (ckpt / "tokenizer.json").exists()


def test_shards_concatenate_back_to_the_hf_tensors(tiny_gpt2, tmp_path):
    ckpt = convert(tiny_gpt2, tmp_path, tp=2)
    hf = _hf_state(tiny_gpt2)

    def read(name, shape):
        return np.fromfile(ckpt / name, dtype="<f4").reshape(shape)

    np.testing.assert_array_equal(read("model.wte.bin", (V, H)), hf["wte.weight"])
    np.testing.assert_array_equal(read("model.wpe.bin", (P, H)), hf["wpe.weight"])
    for i in (0, L - 1):
        p, q = f"model.layers.{i}.", f"h.{i}."
        qkv = np.concatenate([read(p + f"attention.query_key_value.weight.{r}.bin", (H, 3, H // 2)) for r in (0, 1)], -1)
        np.testing.assert_array_equal(qkv.reshape(H, 3 * H), hf[q + "attn.c_attn.weight"])
        bias = np.concatenate([read(p + f"attention.query_key_value.bias.{r}.bin", (3, H // 2)) for r in (0, 1)], -1)
        np.testing.assert_array_equal(bias.reshape(-1), hf[q + "attn.c_attn.bias"])
        dense = np.concatenate([read(p + f"attention.dense.weight.{r}.bin", (H // 2, H)) for r in (0, 1)], 0)
        np.testing.assert_array_equal(dense, hf[q + "attn.c_proj.weight"])
        fc1 = np.concatenate([read(p + f"mlp.dense_h_to_4h.weight.{r}.bin", (H, I // 2)) for r in (0, 1)], -1)
        np.testing.assert_array_equal(fc1, hf[q + "mlp.c_fc.weight"])
        fc2 = np.concatenate([read(p + f"mlp.dense_4h_to_h.weight.{r}.bin", (I // 2, H)) for r in (0, 1)], 0)
        np.testing.assert_array_equal(fc2, hf[q + "mlp.c_proj.weight"])
        np.testing.assert_array_equal(read(p + "post_attention_layernorm.bias.bin", (H,)), hf[q + "ln_2.bias"])


def test_bf16_files_hold_rounded_fp32(tiny_gpt2, tmp_path):
    ckpt = convert(tiny_gpt2, tmp_path, tp=1, weight_data_type="bf16")
    raw = np.fromfile(ckpt / "model.wte.bin", dtype="<u2")
    got = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float().numpy().reshape(V, H)
    ref = torch.from_numpy(_hf_state(tiny_gpt2)["wte.weight"]).bfloat16().float().numpy()
    np.testing.assert_array_equal(got, ref)


def test_rerunning_is_a_no_op(tiny_gpt2, tmp_path):
    ckpt = convert(tiny_gpt2, tmp_path, tp=2)
    before = {f: (ckpt / f).stat().st_mtime_ns for f in os.listdir(ckpt)}
    assert convert(tiny_gpt2, tmp_path, tp=2) == ckpt
    assert {f: (ckpt / f).stat().st_mtime_ns for f in os.listdir(ckpt)} == before


def test_an_interrupted_conversion_leaves_nothing_loadable(tiny_gpt2, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = layout.write_tensor

    def dying_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(layout, "write_tensor", dying_write)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_gpt2, tmp_path, tp=2)
    assert os.listdir(tmp_path) == [], "no target dir and no temporary dir left behind"
    monkeypatch.setattr(layout, "write_tensor", real)
    assert (convert(tiny_gpt2, tmp_path, tp=2) / "config.ini").exists()


def test_a_half_written_temporary_dir_is_never_taken_for_a_checkpoint(tiny_gpt2, tmp_path):
    stale = tmp_path / ".2-gpu.tmp-123"
    stale.mkdir()
    (stale / "model.wte.bin").write_bytes(b"\0" * 8)
    ckpt = convert(tiny_gpt2, tmp_path, tp=2)
    assert ckpt.name == "2-gpu" and (ckpt / "config.ini").exists()
    assert (ckpt / "model.wte.bin").stat().st_size == V * H * 4


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"'BertModel'.*not supported.*gpt2"):
        convert(tmp_path / "bert", tmp_path / "out", tp=1)


def test_tp_that_does_not_divide_heads_is_refused(tiny_gpt2, tmp_path):
    with pytest.raises(ConfigError, match="--tp 3 does not divide the model's 4 attention heads"):
        convert(tiny_gpt2, tmp_path, tp=3)


def test_ft_v53_style_config_without_tensor_para_size(tiny_gpt2, tmp_path):
    """FT's own huggingface_gpt_convert.py (v5.3) wrote fp32 and no tensor_para_size key."""
    from ft_runner.checkpoint.load import read_config

    ckpt = convert(tiny_gpt2, tmp_path / "ours", tp=2)
    ft_dir = tmp_path / "ft" / "2-gpu"
    shutil.copytree(ckpt, ft_dir)
    ini = configparser.ConfigParser()
    ini.read(ft_dir / "config.ini")
    for key in ("tensor_para_size", "layernorm_eps", "activation_type", "layernorm_type"):
        ini.remove_option("gpt", key)
    with open(ft_dir / "config.ini", "w") as fh:
        ini.write(fh)
    config, ckpt_tp = read_config(ft_dir)
    assert ckpt_tp == 2 and config.layernorm_eps == 1e-6 and config.activation_type == "Gelu"


def test_config_round_trips_through_config_ini(tmp_path):
    config = ModelConfig(head_num=4, size_per_head=8, inter_size=128, num_layer=2, vocab_size=77,
                         max_pos_seq_len=64, start_id=1, end_id=2, weight_data_type="fp16", tensor_para_size=2)
    config.to_ini(tmp_path / "config.ini")
    assert ModelConfig.from_ini(tmp_path / "config.ini") == config


def test_cli(tiny_gpt2, tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    out = subprocess.run([sys.executable, "-m", "ft_runner.convert", "-i", str(tiny_gpt2), "-o", str(tmp_path),
                          "--tp", "2", "--weight-data-type", "fp16"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "2-gpu" / "config.ini").exists()
    bad = subprocess.run([sys.executable, "-m", "ft_runner.convert", "-i", str(tmp_path / "nope"), "-o",
                          str(tmp_path), "--tp", "2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "does not exist" in bad.stderr
