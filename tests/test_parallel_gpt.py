"""FT's ParallelGPT Python API (ft_runner/parallel_gpt.py) under a real `mpirun -n 2`, TP=2 (issue 4).

parallel_gpt_check.py is written the way FT's multi_gpu_gpt_example.py is (shape from config.ini,
ParallelGPT(...), load, forward on every rank) and compares with HF transformers on rank 0:
greedy and beam search outputs, bad words, cum_log_probs with the context (2), seed determinism
across batch compositions, and errors raised alike on every rank.
"""

import subprocess

from helpers import ROOT, mpi_env, mpirun

CHECKS = ["shapes", "greedy", "beams", "bad_words", "cum_log_probs_2", "seed", "errors"]


def test_an_ft_style_script_runs_on_parallel_gpt_under_mpirun_tp2(tiny_gpt2, tmp_path):
    cmd = mpirun(2, str(ROOT / "tests" / "parallel_gpt_check.py"), "--model", str(tiny_gpt2),
                 "--out", str(tmp_path), "--tp", "2")
    result = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    lines = {line.split()[1]: line.split()[2] for line in output.splitlines() if line.startswith("CHECK ")}
    assert lines == {name: "ok" for name in CHECKS}, output
    assert result.returncode == 0, output
