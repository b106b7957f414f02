"""The parallel runtime: MPI ranks, FT's TP x PP grid, devices, and torch.distributed groups.

Rank and size come from MPI; torch.distributed (NCCL on GPUs, gloo on CPUs) is bootstrapped from
it on a port rank 0 picks. FT's mapping: tp_rank = rank % TP, pp_rank = rank // TP; a rank's GPU
is its local rank on its node.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
from typing import Optional

import torch
import torch.distributed as dist

from ft_runner.config import ConfigError

# Workers idle in the MPI control channel, not in torch collectives, so this only bounds a
# collective whose peer died; the job is torn down by MPI long before it expires.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where one rank sits in the TP x PP grid."""

    rank: int
    world: int
    tp: int
    pp: int

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"--tp and --pp must be at least 1 (got --tp {self.tp} --pp {self.pp})")
        if self.world != self.tp * self.pp:
            raise ConfigError(
                f"mpirun started {self.world} ranks but --tp {self.tp} x --pp {self.pp} needs "
                f"{self.tp * self.pp}: run `mpirun -n {self.tp * self.pp}` or change --tp/--pp"
            )

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_rank(self, pp_rank: int) -> int:
        """The world rank with this rank's tp_rank in pipeline stage `pp_rank`."""
        return pp_rank * self.tp + self.tp_rank

    @property
    def sampler_rank(self) -> int:
        """Rank that owns the sampled tokens: tp_rank 0 of the last stage."""
        return (self.pp - 1) * self.tp


@dataclasses.dataclass
class Runtime:
    grid: Grid
    device: torch.device
    tp_group: Optional[dist.ProcessGroup]
    comm: object  # mpi4py COMM_WORLD
    pipe: Optional[Pipe] = None  # with PP > 1: the stages' hand-offs

    @property
    def rank(self) -> int:
        return self.grid.rank


class Pipe:
    """Pipeline hand-offs on groups of their own: hidden states stage to stage, and the last stage's
    logits back to rank 0.

    Sends do not wait: with several micro-batches in flight, rank 0 sends one micro-batch's hidden
    states on while the last stage sends an earlier one's logits back, and blocking sends (gloo) or
    one shared NCCL stream would have each wait for the other. Two groups keep the two directions
    apart; a send's handle is kept (and its tensor alive) until a later send waits for it."""

    KEEP = 8  # sends in flight per rank before the oldest is waited for

    def __init__(self, grid: Grid):
        self.grid = grid
        self.hidden = dist.new_group(list(range(grid.world)))
        self.logits = dist.new_group(sorted({0, grid.sampler_rank}))
        self._sends: list = []

    def send_next(self, h: torch.Tensor) -> None:
        """This stage's output to the same TP rank of the next stage."""
        self._send(h, self.grid.stage_rank(self.grid.pp_rank + 1), self.hidden)

    def recv_prev(self, h: torch.Tensor) -> torch.Tensor:
        dist.recv(h, src=self.grid.stage_rank(self.grid.pp_rank - 1), group=self.hidden)
        return h

    def send_logits(self, logits: torch.Tensor) -> None:
        self._send(logits, 0, self.logits)

    def recv_logits(self, logits: torch.Tensor) -> torch.Tensor:
        dist.recv(logits, src=self.grid.sampler_rank, group=self.logits)
        return logits

    def _send(self, tensor: torch.Tensor, dst: int, group) -> None:
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, dst=dst, group=group), tensor))
        while len(self._sends) > self.KEEP:
            self._sends.pop(0)[0].wait()

    def flush(self) -> None:
        """Wait for every send (before the groups go)."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()


def mpi_comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def node_allgather(comm, value) -> tuple[int, list]:
    """This rank's index on its node, and `value` from every rank of the node."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank(), node.allgather(value)
    finally:
        node.Free()


def pick_device(comm, device: str) -> torch.device:
    """`auto`: the local rank's GPU when there are GPUs, else the CPU.

    A launcher that binds one GPU to each task (`srun --gpus-per-task=1`) leaves every rank one
    visible device of its own: each rank then takes cuda:0."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no GPU")
    local_rank, visible = node_allgather(comm, os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    local_size = len(visible)
    count = torch.cuda.device_count()
    if count == 1 and all(visible) and len(set(visible)) == local_size:
        index = 0
    elif local_size > count:
        raise ConfigError(
            f"{local_size} ranks share this node but it has {count} GPU(s): one GPU per rank "
            f"is needed (start fewer ranks per node, or use --device cpu)"
        )
    else:
        index = local_rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _master_address(comm) -> str:
    """127.0.0.1 when every rank shares rank 0's node, else rank 0's host name."""
    from mpi4py import MPI

    local_size = len(node_allgather(comm, None)[1])
    same_node = comm.allreduce(local_size, op=MPI.MIN) == comm.Get_size()
    return os.environ.get("FT_RUNNER_MASTER_ADDR") or ("127.0.0.1" if same_node else socket.getfqdn())


def init_runtime(tp: int, pp: int, device: str = "auto") -> Runtime:
    """Check the grid, pick the device and start torch.distributed; raises ConfigError alike on every rank."""
    comm = mpi_comm()
    grid = Grid(comm.Get_rank(), comm.Get_size(), tp, pp)
    dev = agree(comm, lambda: pick_device(comm, device))
    if grid.world == 1:
        return Runtime(grid, dev, None, comm)
    address = _master_address(comm)
    port = comm.bcast(_free_port() if grid.rank == 0 else None, root=0)
    address = comm.bcast(address, root=0)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=grid.rank,
                            world_size=grid.world, timeout=COLLECTIVE_TIMEOUT,
                            **({"device_id": dev} if dev.type == "cuda" else {}))
    tp_group = None
    for stage in range(pp):  # every rank must create every group, in the same order
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp)))
        if stage == grid.pp_rank:
            tp_group = group
    pipe = Pipe(grid) if pp > 1 else None  # after the TP groups: every rank creates groups in one order
    return Runtime(grid, dev, tp_group, comm, pipe)


def agree(comm, fn):
    """Run `fn` on every rank; if it fails on any rank, raise the first failure's message on all."""
    try:
        result, error = fn(), None
    except ConfigError as exc:
        result, error = None, str(exc)
    errors = comm.allgather(error)
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)
    return result


def shutdown(runtime: Runtime) -> None:
    if runtime.pipe is not None:
        runtime.pipe.flush()
    if dist.is_initialized():
        dist.destroy_process_group()


def from_root(comm, fn) -> str:
    """Rank 0 runs `fn` (returning a string); every rank gets the string or rank 0's ConfigError.

    The others wait in a polled non-blocking broadcast so they do not spin a core meanwhile.
    """
    import numpy as np

    if comm.Get_rank() == 0:
        try:
            status, text = 0, fn()
        except ConfigError as exc:
            status, text = 1, str(exc)
        payload = text.encode("utf-8")
        comm.Ibcast(np.array([status, len(payload)], dtype=np.int64), root=0).Wait()
        comm.Bcast(np.frombuffer(payload, dtype=np.uint8).copy(), root=0)
    else:
        header = np.zeros(2, dtype=np.int64)
        request = comm.Ibcast(header, root=0)
        while not request.Test():
            time.sleep(0.005)
        buffer = np.empty(int(header[1]), dtype=np.uint8)
        comm.Bcast(buffer, root=0)
        status, text = int(header[0]), buffer.tobytes().decode("utf-8")
    if status:
        raise ConfigError(text)
    return text
