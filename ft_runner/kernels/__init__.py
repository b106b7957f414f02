"""Fused kernels for the decode step, in Triton, each beside a plain-torch reference.

Every op here dispatches on its inputs: CUDA tensors (or TRITON_INTERPRET=1, for testing the
kernels on a CPU) take the Triton kernel, anything else the torch reference, so the engine runs
the same code on every device and the CPU tests cover its logic.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Take the Triton kernel for this tensor? (FT_RUNNER_TRITON=0 turns them all off.)"""
    if os.environ.get("FT_RUNNER_TRITON", "1") == "0" or not triton_importable():
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
