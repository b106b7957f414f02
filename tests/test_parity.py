"""Logits and greedy tokens equal HF transformers' under real mpirun ranks for every grid."""

import subprocess

import pytest
from helpers import ROOT, mpi_env, mpirun


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_logits_and_greedy_tokens_match_hf(tiny_gpt2, tmp_path, tp, pp):
    cmd = mpirun(tp * pp, str(ROOT / "tests" / "parity_check.py"), "--model", str(tiny_gpt2),
                 "--out", str(tmp_path), "--tp", str(tp), "--pp", str(pp))
    result = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    line = next(line for line in output.splitlines() if line.startswith("PARITY"))
    assert "greedy_equal=True" in line, output
    assert float(line.split("max_abs_diff=")[1].split()[0]) <= 1e-4
