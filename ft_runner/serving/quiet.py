"""Silence the few start-up lines that report nothing wrong, each matched exactly, so that a clean start
logs no warning or error line (a test asserts it) and a real one stands out."""

from __future__ import annotations

# A GPU build of tritonserver (PyTriton's) says these once at start on a machine without a CUDA
# driver: nothing is wrong, the server runs on the CPU, and no flag of Triton 2.51 turns them off.
CPU_ONLY_TRITON_LINES = (
    "CudaDriverHelper has not been initialized.",
    "Unable to allocate pinned system memory, pinned memory pool will not be available: "
    "CUDA driver version is insufficient",
)


def quiet_known_noise(cpu: bool) -> None:
    if cpu:
        _drop_triton_lines(CPU_ONLY_TRITON_LINES)


def _drop_triton_lines(noise: tuple[str, ...]) -> None:
    """PyTriton prints tritonserver's output as it reads it, in chunks: drop whole lines holding `noise`."""
    from pytriton.server.triton_server import TritonServer

    original = getattr(TritonServer._record_logs, "__wrapped__", TritonServer._record_logs)

    def _record_logs(self, chunk) -> None:
        text = chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk
        *lines, self._ft_runner_partial = (getattr(self, "_ft_runner_partial", "") + text).split("\n")
        for line in lines:
            if not any(n in line for n in noise):
                original(self, line + "\n")

    _record_logs.__wrapped__ = original
    TritonServer._record_logs = _record_logs
