"""benchmarks/bench_generate.py runs end to end on a CPU with a tiny shape (the GPU numbers are in
BENCHMARKS.md): rows for ft_runner and HF eager, printed and appended as JSON lines."""

import json
import subprocess
import sys

from helpers import ROOT, mpi_env

KEYS = {"engine", "model", "dtype", "tp", "pp", "batch", "prompt_len", "new_tokens", "ms_per_step", "tok_s",
        "ttft_ms", "mbu", "gpu", "torch", "commit"}


def test_bench_generate_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--models", "tiny", "--device", "cpu",
           "--dtype", "fp32", "--batch", "1,2", "--prompt-len", "8", "--new-tokens", "4", "--runs", "1",
           "--engines", "ft_runner,hf-eager", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "res")]
    result = subprocess.run(cmd, env=mpi_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "x compiled" in output and "ft_runner" in output
    files = list((tmp_path / "res").glob("*_cpu-*.jsonl"))
    assert len(files) == 1, output
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert {(r["engine"], r["batch"]) for r in rows} == {(e, b) for e in ("ft_runner", "hf-eager") for b in (1, 2)}
    for row in rows:
        assert KEYS <= row.keys()
        assert row["ms_per_step"] > 0 and row["tok_s"] > 0 and row["ttft_ms"] > 0 and row["mbu"] > 0
