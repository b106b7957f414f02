"""The before/after REST benchmark runs end to end on CPU (a smoke test; real numbers come from GPUs)."""

import json
import subprocess
import sys

from helpers import ROOT, mpi_env


def test_before_after_benchmark_smoke(tiny_gpt2, tmp_path):
    out = tmp_path / "ba"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "before_after.py"), "--model", str(tiny_gpt2),
                             "--tp", "2", "--concurrency", "1", "2", "--requests", "4", "--max-tokens", "8",
                             "--out", str(out)], env=mpi_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "ba.log").read_text()
    rows = json.loads((tmp_path / "ba.json").read_text())
    assert {(r["engine"], r["concurrency"]) for r in rows} == {
        (e, c) for e in ("hf-fastapi", "ft_runner") for c in (1, 2)}
    assert all(r["out_tok_s"] > 0 and r["ttft_p50_ms"] <= r["latency_p50_ms"] for r in rows)
    assert (tmp_path / "ba.png").stat().st_size > 10_000
    assert "out tok/s" in result.stdout
