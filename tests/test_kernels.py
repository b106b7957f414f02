"""The Triton kernels equal their torch references, run on the CPU through Triton's interpreter.

Skipped where Triton is not installed (as in CI); on GPUs, benchmarks/gpu_checks.py runs the same
checks (ft_runner/kernels/selfcheck.py) compiled.
"""

import subprocess
import sys

import pytest
from helpers import ROOT, mpi_env

pytest.importorskip("triton")


def test_triton_kernels_match_torch_references():
    # TRITON_INTERPRET must be set before triton is first imported, so this runs in its own process
    result = subprocess.run([sys.executable, "-m", "ft_runner.kernels.selfcheck", "--device", "cpu"],
                            env=mpi_env(TRITON_INTERPRET="1"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "SELFCHECK ok" in output, output
