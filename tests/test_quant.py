"""Quantized serving on CPUs: per-channel int8 and fp8 (the torch references), the converter's int8
checkpoints, the e4m3 paged KV cache, refusals, TP=2 parity under mpirun, and the embedded
model's perplexity on held-out text."""

import configparser
import inspect
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, TOKENIZER_DIR, mpi_env, mpirun

from ft_runner import parallel
from ft_runner.checkpoint import layout
from ft_runner.checkpoint.convert import convert
from ft_runner.checkpoint.load import load_stage
from ft_runner.config import ConfigError, EngineConfig, QuantConfig
from ft_runner.engine.core import EngineCore
from ft_runner.engine.model_runner import ModelRunner
from ft_runner.engine.request import SamplingOptions
from ft_runner.kernels import ops
from ft_runner.model import quant

H, L, I = 48, 4, 192  # noqa: E741  (the tiny_gpt2 fixture's shape)


@pytest.fixture(scope="module")
def runtime():
    rt = parallel.init_runtime(1, 1, "cpu")
    yield rt


def _linears(stage) -> dict:
    return {name: (m.weight.clone(), None if m.weight_scale is None else m.weight_scale.clone())
            for name, m in quant.quantized_linears(stage)}


# --- the quantization itself ---------------------------------------------------------------------


@pytest.mark.parametrize("kind,top", [("int8_wo", 127), ("fp8", 448)])
def test_per_channel_scales_and_round_trip(kind, top):
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    w[2] *= 100  # a large channel does not coarsen the others
    qw = quant.quantize(w, kind)
    assert qw.q.dtype == quant.QUANT_DTYPES[kind] and qw.scale.dtype == torch.float32
    torch.testing.assert_close(qw.scale, w.abs().amax(1) / top)
    assert float(qw.q.float().abs().amax(1).min()) == top  # each channel reaches the format's largest value
    err = (qw.dequantize() - w).abs() / w.abs().amax(1, keepdim=True)
    assert float(err.max()) <= (0.5 / 127 if kind == "int8_wo" else 1 / 16)


def test_row_parallel_shards_keep_whole_channel_scales():
    """A row-parallel shard quantized with its whole channels' scales is the slice of the whole
    quantized weight: the model does not depend on the TP."""
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    whole = quant.quantize(w, "int8_wo")
    for piece, q_piece in zip(w.chunk(2, dim=1), whole.q.chunk(2, dim=1)):
        shard = quant.quantize(piece, "int8_wo", quant.channel_scale(w, "int8_wo"))
        assert torch.equal(shard.q, q_piece) and torch.equal(shard.scale, whole.scale)


def test_fp8_saturates_instead_of_nan():
    assert torch.isfinite(quant.to_fp8(torch.tensor([1e6, -1e6, 447.0])).float()).all()
    q, s = quant.quantize_rows_fp8(torch.zeros(2, 8))  # an all-zero row keeps a positive scale
    assert (s > 0).all() and (q.float() == 0).all()


@pytest.mark.parametrize("kind", ["int8_wo", "fp8"])
def test_quantized_linear_is_the_product_with_dequantized_values(kind):
    torch.manual_seed(2)
    x, w, b, res = torch.randn(5, 32), torch.randn(24, 32), torch.randn(24), torch.randn(5, 12)
    qw = quant.quantize(w, kind)
    x_seen = x if kind == "int8_wo" else quant.fake_quantize_rows_fp8(x)
    got = ops.linear(x, qw, b, "silu", gated=True, residual=res)
    gate, up = F.linear(x_seen, qw.dequantize(), b).chunk(2, dim=-1)
    torch.testing.assert_close(got, F.silu(gate) * up + res)


# --- checkpoints ---------------------------------------------------------------------------------


def test_int8_checkpoint_files_and_config(tiny_gpt2, tmp_path):
    ckpt = convert(tiny_gpt2, tmp_path, tp=2, weight_data_type="int8")
    ini = configparser.ConfigParser()
    ini.read(ckpt / "config.ini")
    assert ini["gpt"]["weight_data_type"] == "int8" and ini["gpt"]["float_data_type"] == "fp16"
    p = "model.layers.0."
    sizes = {  # kernels: one byte a value, as FT's layout splits them; scales: fp32, cut as the outputs
        f"{p}attention.query_key_value.weight.0.bin": H * 3 * H // 2,
        f"{p}attention.query_key_value.scale_w_quant_orig.0.bin": 3 * H // 2 * 4,
        f"{p}attention.dense.weight.1.bin": H // 2 * H,
        f"{p}attention.dense.scale_w_quant_orig.bin": H * 4,  # row-parallel: whole on every rank
        f"{p}mlp.dense_h_to_4h.weight.1.bin": H * I // 2,
        f"{p}mlp.dense_h_to_4h.scale_w_quant_orig.1.bin": I // 2 * 4,
        f"{p}mlp.dense_4h_to_h.weight.0.bin": I // 2 * H,
        f"{p}mlp.dense_4h_to_h.scale_w_quant_orig.bin": H * 4,
        f"{p}attention.query_key_value.bias.0.bin": 3 * H // 2 * 2,  # everything else fp16
        "model.wte.bin": 1027 * H * 2,
    }
    for name, size in sizes.items():
        assert (ckpt / name).stat().st_size == size, name
    assert not (ckpt / f"{p}attention.dense.scale_w_quant_orig.0.bin").exists()


def test_int8_checkpoint_loads_as_quantizing_at_load(tiny_gpt2, tmp_path, runtime):
    """The int8 files (TP=2, re-split for TP=1 by the loader) hold what quantizing the fp32
    checkpoint (the converter's source values) at load gives: the same int8 values and scales."""
    int8 = convert(tiny_gpt2, tmp_path / "int8", tp=2, weight_data_type="int8")
    fp32 = convert(tiny_gpt2, tmp_path / "fp32", tp=1, weight_data_type="fp32")
    args = (runtime.grid, runtime.tp_group, "fp32", runtime.device, QuantConfig("int8_wo"))
    from_files, at_load = _linears(load_stage(int8, *args)), _linears(load_stage(fp32, *args))
    assert from_files.keys() == at_load.keys() and len(from_files) == 4 * L
    for name, (q, scale) in from_files.items():
        assert q.dtype == torch.int8 and torch.equal(q, at_load[name][0]), name
        torch.testing.assert_close(scale, at_load[name][1], rtol=0, atol=0)


def test_quantized_stage_keeps_embeddings_and_head_in_the_model_dtype(tiny_gpt2, tmp_path, runtime):
    ckpt = convert(tiny_gpt2, tmp_path, tp=1)
    stage = load_stage(ckpt, runtime.grid, runtime.tp_group, "fp16", runtime.device, QuantConfig("int8_wo"))
    assert stage.wte.weight.dtype == stage.lm_head.weight.dtype == stage.layers[0].ln1.weight.dtype == torch.float16
    assert stage.layers[0].attn.qkv.weight.dtype == torch.int8
    assert stage.layers[0].attn.qkv.weight_scale.dtype == torch.float32


def test_refusals(tiny_gpt2, tmp_path, runtime):
    with pytest.raises(ConfigError, match="FP8 needs a GPU"):
        QuantConfig("fp8").check_device(torch.device("cpu"))
    with pytest.raises(ConfigError, match="FP8 needs a GPU"):
        QuantConfig(kv_cache_dtype="fp8").check_device(torch.device("cpu"))
    with pytest.raises(ConfigError, match="SmoothQuant"):
        QuantConfig.from_flags(int8_mode=2)
    with pytest.raises(ConfigError, match="means --quantization int8_wo"):
        QuantConfig.from_flags("fp8", int8_mode=1)
    assert QuantConfig.from_flags(int8_mode=1).quantization == "int8_wo"
    assert QuantConfig.from_flags(weight_data_type="int8").quantization == "int8_wo"
    with pytest.raises(ConfigError, match="not one of"):
        QuantConfig("int4")
    ckpt = convert(tiny_gpt2, tmp_path, tp=1, weight_data_type="int8")
    with pytest.raises(ConfigError, match="serve it with --quantization int8_wo"):
        load_stage(ckpt, runtime.grid, runtime.tp_group, "fp32", runtime.device)


# --- the e4m3 paged KV cache ---------------------------------------------------------------------


def test_fp8_paged_cache_stores_scaled_e4m3():
    torch.manual_seed(3)
    kv_heads, D, block = 2, 8, 8
    k_cache = quant.to_fp8(torch.zeros(4, kv_heads, block, D))
    v_cache = k_cache.clone()
    kv_scale = torch.tensor([0.5, 0.25])
    qkv = torch.randn(2, (4 + 2 * kv_heads) * D)
    tables = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    positions = torch.tensor([3, 9])
    ops.paged_decode_attention(qkv, k_cache, v_cache, tables, positions, 4, kv_heads, D, D ** -0.5,
                               kv_scale=kv_scale)
    k = qkv[:, 4 * D:(4 + kv_heads) * D].view(2, kv_heads, D)
    assert torch.equal(k_cache[2, :, 3].float(), quant.to_fp8(k[0] / 0.5).float())
    assert torch.equal(k_cache[3, :, 1].float(), quant.to_fp8(k[1] / 0.5).float())
    v = qkv[:, (4 + kv_heads) * D:].view(2, kv_heads, D)
    assert torch.equal(v_cache[3, :, 1].float(), quant.to_fp8(v[1] / 0.25).float())


def test_fp8_cache_prefill_and_decode_agree(tiny_gpt2, tmp_path, runtime):
    """Through the in-flight engine with e4m3 weights and cache: a prompt computed a token a step
    (1-token prefill chunks), then two decodes, give the tokens and log-probs that one prefill of
    the whole sequence gives (every step reads the e4m3 pages the earlier ones wrote)."""
    ckpt = convert(tiny_gpt2, tmp_path, tp=1)
    stage = load_stage(ckpt, runtime.grid, runtime.tp_group, "fp32", runtime.device,
                       QuantConfig("fp8", "fp8", emulate_fp8=True))
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=1, kv_block_size=8, kv_cache_blocks=8)
    core = EngineCore(stage, runtime, config)
    assert core.runner.cache.k.dtype == quant.FP8 and core.runner.cache.scales is not None
    prompt = [5, 17, 300, 42, 8, 99, 1000, 3, 64]
    core.add_request(prompt, SamplingOptions(max_tokens=3, end_id=-1))
    events = []
    while core.has_unfinished():
        events += [e for e in core.step() if e.token >= 0]
    tokens = [e.token for e in events]
    logp = torch.log_softmax(core.runner.prompt_logits(prompt + tokens[:2]), -1)[-3:]
    assert tokens == logp.argmax(-1).tolist()
    np.testing.assert_allclose([e.logprob for e in events], logp.gather(1, torch.tensor(tokens)[:, None])[:, 0],
                               atol=1e-4)


# --- TP=2 under mpirun ---------------------------------------------------------------------------


def test_tp2_quantized_matches_hf_with_the_quantization_faked(tiny_gpt2, tmp_path):
    """int8_wo and fp8 (weights and per-token activations) on 2 real ranks: logits, batched and solo
    greedy tokens, the in-flight engine's (preempting) against HF with the same
    quantization faked (parity_check.py)."""
    cmd = mpirun(2, str(ROOT / "tests" / "parity_check.py"), "--model", str(tiny_gpt2), "--out", str(tmp_path),
                 "--tp", "2", "--quantization", "int8_wo,fp8", "--new-tokens", "16", "--solo", "1",
                 "--no-prefix-cache-check")
    result = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = [line for line in output.splitlines() if line.startswith("PARITY")]
    assert [line.split()[2] for line in lines] == ["quantization=int8_wo", "quantization=fp8"], output
    for line in lines:
        assert "greedy_equal=True" in line and "inflight_equal=True" in line, output
        assert float(line.split("max_abs_diff=")[1].split()[0]) <= 1e-4


# --- accuracy on the trained embedded model --------------------------------------------------------

# Held-out text: docstrings of standard-library modules. The embedded model was trained on
# pydoc_data.topics (the language reference's topics) and holds nothing out; these modules' API
# docstrings are not in it (9 of 5,633 8-word runs of them occur there).
HELD_OUT_MODULES = ("textwrap", "heapq", "bisect", "fractions", "statistics", "shlex", "difflib", "calendar")


def held_out_text(limit: int = 24000) -> str:
    import importlib

    texts = []
    for name in HELD_OUT_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if (not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                    and getattr(obj, "__module__", "") == name and len(inspect.getdoc(obj) or "") > 80):
                texts.append(inspect.getdoc(obj))
    return "\n\n".join(texts)[:limit]


def perplexity(stage, runtime, ids: list[int], window: int = 256) -> float:
    """exp(mean NLL) of `ids` in windows of the model's context, each scored in one prefill through
    the paged cache (ModelRunner.prompt_logits)."""
    pages = window // 16 + 1
    runner = ModelRunner(stage, runtime, EngineConfig(kv_block_size=16, kv_cache_blocks=pages), pages)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        logp = torch.log_softmax(runner.prompt_logits(chunk[:-1]), -1)
        nll -= float(logp.gather(1, torch.tensor(chunk[1:])[:, None]).sum())
        count += len(chunk) - 1
    return float(np.exp(nll / count))


def test_embedded_model_perplexity_rises_at_most_1_and_3_percent(tmp_path, runtime):
    import transformers

    model = ROOT / "ft_runner" / "assets" / "tiny-gpt2"
    ids = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)(held_out_text())["input_ids"]
    ckpt = convert(model, tmp_path, tp=1, log=lambda *_: None)
    ppl = {}
    for name, q in (("fp32", QuantConfig()), ("int8_wo", QuantConfig("int8_wo")),
                    ("fp8", QuantConfig("fp8", "fp8", emulate_fp8=True))):
        ppl[name] = perplexity(load_stage(ckpt, runtime.grid, runtime.tp_group, "fp32", runtime.device, q),
                               runtime, ids)
    print(f"perplexity over {len(ids)} held-out tokens: {ppl}")
    assert ppl["int8_wo"] <= 1.01 * ppl["fp32"] and ppl["fp8"] <= 1.03 * ppl["fp32"], ppl


def test_layout_scale_spec_matches_the_output_axes():
    from ft_runner.config import ModelConfig

    config = ModelConfig(head_num=4, size_per_head=12, inter_size=192, num_layer=1, vocab_size=10, max_pos_seq_len=8,
                         start_id=0, end_id=0, weight_data_type="int8")
    specs = {s.param: s for s in layout.layer_specs(config) if s.kernel}
    qkv = layout.scale_spec(specs["attn.qkv.weight"])
    assert qkv.shape(config) == (12, 12) and isinstance(qkv.split, layout.QKV) and qkv.param == "attn.qkv.weight_scale"
    assert layout.scale_spec(specs["attn.dense.weight"]).split is None
    assert layout.scale_spec(specs["mlp.fc1.weight"]).split == layout.Axis(-1)
