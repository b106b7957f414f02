"""Grids of 4 and 8 CPU ranks (the CPU stand-in for the 4- and 8-GPU runs of issues 7 and 8):
TP=4, TP=8 and TP=4 x PP=2 on tiny GPT-2 and Llama models, against HF transformers."""

import subprocess

import pytest
import torch
import transformers
from helpers import ROOT, TOKENIZER_DIR, make_tiny_gpt2, mpi_env, mpirun


@pytest.fixture(scope="module")
def eight_head_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eight")
    gpt2 = make_tiny_gpt2(root / "gpt2-8h", seed=1, n_embd=64, n_head=8, n_layer=4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(2)
    config = transformers.LlamaConfig(vocab_size=1029, hidden_size=64, intermediate_size=88, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=0, rope_theta=10000.0)
    llama = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.05)
    llama.save_pretrained(root / "llama-8h-2kv")
    tokenizer.save_pretrained(root / "llama-8h-2kv")
    return [gpt2, root / "llama-8h-2kv"]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(8, 1), (4, 2)])
def test_four_and_eight_rank_grids_match_hf(eight_head_models, tmp_path, tp, pp):
    cmd = mpirun(tp * pp, str(ROOT / "tests" / "parity_check.py"), "--model", *map(str, eight_head_models),
                 "--out", str(tmp_path), "--tp", str(tp), "--pp", str(pp), "--new-tokens", "16",
                 "--no-prefix-cache-check")  # test_families' grids check the prefix cache across ranks
    result = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    lines = [line for line in output.splitlines() if line.startswith("PARITY")]
    assert len(lines) == 2 and all("greedy_equal=True" in line for line in lines), output[-5000:]
