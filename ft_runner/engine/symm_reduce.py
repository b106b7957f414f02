"""All-reduce of small CUDA activations through PyTorch symmetric memory.

A tensor-parallel decode step sums one small (rows, hidden) activation per layer over the TP
group, where NCCL's fixed cost per call dominates. `torch.ops.symm_mem.one_shot_all_reduce` is a
single kernel: every rank reads each peer's copy of a shared buffer over NVLink and sums locally,
with a barrier on the signal pads at its start and at its end. That end barrier is why the buffer
can be rewritten by the next layer without another barrier, and since the rendezvous is cached
and done before any capture, the op also runs inside CUDA graphs.

The kernel takes bf16 and fp32 only (not fp16), so the buffer is fp32: the producing projection
writes its partial product into it in fp32 and the sum comes back in fp32, with no cast kernels
and no rounding of the partial sums.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

# Measured on 2 H200s (GPT-J-6B, BENCHMARKS.md): 2.162 ms/step against NCCL's 2.215 at batch 1, but
# 3.087 against 3.063 at batch 32; so only sums of up to MAX_ROWS rows come here, the rest go to NCCL.
MAX_ROWS = 16
CAPACITY = MAX_ROWS * 8192  # fp32 elements (512 KiB): MAX_ROWS rows of a hidden size up to 8192
_INSTANCES: dict[tuple, SymmetricAllReduce | None] = {}  # by (group, device): see `create`


class SymmetricAllReduce:
    """One fp32 symmetric buffer of a TP group and the one-shot sum over it."""

    def __init__(self, group, device: torch.device, numel: int = CAPACITY):
        self.group, self.device, self.numel = group, device, numel
        self.group_name = group.group_name
        self.buffer: torch.Tensor | None = None

    @staticmethod
    def available(group, device: torch.device) -> bool:
        """Worth trying here? The same answer on every rank (no collective needed)."""
        if group is None or device.type != "cuda" or os.environ.get("FT_RUNNER_SYMM_MEM", "1") == "0":
            return False
        if not 2 <= dist.get_world_size(group) <= 8:
            return False
        try:
            import torch.distributed._symmetric_memory  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def create(cls, group, device: torch.device) -> SymmetricAllReduce | None:
        """The group's instance, or None where it cannot run (after one warning, on every rank
        alike). The first call per group and device is a collective: every rank of the group makes
        it at the same point, outside CUDA-graph capture. Later calls (another Generator) share that
        buffer rather than allocating again: symmetric allocations must stay in step on every rank,
        which garbage collection would not guarantee, and decode steps never overlap anyway."""
        if not cls.available(group, device):
            return None
        if (group, device) not in _INSTANCES:
            _INSTANCES[group, device] = cls._setup(group, device)
        return _INSTANCES[group, device]

    @classmethod
    def _setup(cls, group, device: torch.device) -> SymmetricAllReduce | None:
        """Allocate, rendezvous and check, the ranks agreeing after each step, so a step failing on
        one rank never leaves the others waiting in a later one."""
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("symmetric-memory setup must run before CUDA-graph capture")
        symm = cls(group, device)
        for step in (symm._allocate, symm._rendezvous, symm._check):
            error = None
            try:
                step()
            except Exception as exc:  # any failure means NCCL, on every rank
                error = exc
            if not _on_every_rank(error is None, group, device):
                warnings.warn(f"symmetric-memory all-reduce unavailable ({error or 'failed on another rank'}); "
                              "using NCCL", stacklevel=3)
                return None
        return symm

    def _allocate(self) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        self.buffer = symm_mem.empty(self.numel, dtype=torch.float32, device=self.device)

    def _rendezvous(self) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        symm_mem.rendezvous(self.buffer, self.group_name)

    def _check(self) -> None:
        """One real sum, so a build or link that cannot run the kernel is found now."""
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        partial = self.partial(1, 64)
        partial.fill_(rank + 1)
        if not torch.equal(self(partial), torch.full_like(partial, size * (size + 1) // 2)):
            raise RuntimeError("wrong one-shot all-reduce result")

    def partial(self, rows: int, cols: int) -> torch.Tensor | None:
        """A (rows, cols) fp32 view of the buffer for this rank's part, or None if it does not fit."""
        if rows > MAX_ROWS or rows * cols > self.numel:
            return None
        return self.buffer[:rows * cols].view(rows, cols)

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the group of `partial` (a view from `partial`, written on every rank), as a new tensor."""
        return torch.ops.symm_mem.one_shot_all_reduce(partial, "sum", self.group_name)


def _on_every_rank(ok: bool, group, device: torch.device) -> bool:
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
