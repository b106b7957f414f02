"""The symmetric-memory all-reduce stays off where it cannot run, and FusedDecoder's projections
write into its buffer and use its sum (with a stand-in for the CUDA op, so this runs on a CPU)."""

import types

import torch

from ft_runner.engine.decode import FusedDecoder
from ft_runner.engine.symm_reduce import SymmetricAllReduce


def test_unavailable_without_a_cuda_tp_group(monkeypatch):
    assert not SymmetricAllReduce.available(None, torch.device("cuda"))
    assert not SymmetricAllReduce.available(object(), torch.device("cpu"))
    monkeypatch.setenv("FT_RUNNER_SYMM_MEM", "0")
    assert not SymmetricAllReduce.available(object(), torch.device("cuda"))
    assert SymmetricAllReduce.create(None, torch.device("cuda")) is None


class _TwoEqualRanks:
    """SymmetricAllReduce's interface over a CPU buffer: the sum of two ranks holding the same part."""

    def __init__(self, numel):
        self.buffer = torch.full((numel,), float("nan"))

    def partial(self, rows, cols):
        return self.buffer[:rows * cols].view(rows, cols) if rows * cols <= self.buffer.numel() else None

    def __call__(self, partial):
        assert partial.data_ptr() == self.buffer.data_ptr()
        return partial * 2


def test_projection_sums_through_the_buffer_when_it_fits():
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    decoder = types.SimpleNamespace(symm=_TwoEqualRanks(12), group=None)
    for rows, factor in ((1, 2), (2, 2), (3, 1)):  # 3 x 6 does not fit: the plain path (no group: no sum)
        x = torch.randn(rows, 5)
        y = FusedDecoder._project_reduce(decoder, x, weight)
        torch.testing.assert_close(y, factor * (x @ weight.T))
