"""No leftovers on any way a server ends (issue 18): SIGINT or SIGTERM to rank 0, SIGTERM to mpirun, a
rank SIGKILLed. Each run has its own TMPDIR; the test counts processes, /dev/shm files and Triton's
model folders before and after."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import ROOT, Server, mpi_env

SHM_PREFIXES = ("pytrtion", "psm_", "sm_segment.")
# torch's compile cache: a cache that the next run reuses, not something a run leaves behind
CACHES = ("torchinductor_",)


def _pids(pattern: str, within: str) -> list[int]:
    """Live processes whose command line matches `pattern` and mentions `within`."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    found = []
    for pid in map(int, out):
        try:
            if within in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(pid)
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return False


def _model_folders(tmpdir: Path) -> list[Path]:
    """tritonserver's model copies (folderXXXXXX, in /tmp whatever TMPDIR says) that belong to this run."""
    found = []
    for root in {Path("/tmp"), tmpdir}:
        for folder in root.glob("folder??????"):
            try:
                if str(tmpdir) in (folder / "config.pbtxt").read_text(errors="replace"):
                    found.append(folder)
            except OSError:
                continue
    return found


def _free_shm() -> set[str]:
    from ft_runner.serving.janitor import files_in_use

    used = files_in_use()
    return {f for f in os.listdir("/dev/shm") if f.startswith(SHM_PREFIXES) and f"/dev/shm/{f}" not in used}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint-rank0", "sigterm-rank0", "sigterm-mpirun", "sigkill-rank1"])
def test_no_leftovers_however_the_server_ends(tiny_gpt2, tmp_path, how):
    tmpdir = Path(tempfile.mkdtemp(prefix="ftr-", dir="/tmp"))  # short: PyTriton puts Unix sockets in it
    shm_before = _free_shm()
    server = Server(2, "--tp", "2", "--hf-model-name", str(tiny_gpt2), "--openai-port", "0", tmp=tmp_path)
    server.log = open(server.log_path, "w")
    server.proc = subprocess.Popen(server.cmd, env=mpi_env(TMPDIR=str(tmpdir)), stdout=server.log,
                                   stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (server.ready() and "rank 0 pid" in server.output()):
            assert time.time() < deadline and server.proc.poll() is None, server.output()
            time.sleep(0.3)
        ranks = server.rank_pids()
        rank0 = int(server.output().split("rank 0 pid ")[1].split()[0])
        processes = ranks + _pids("tritonserver|triton_python_backend_stub|ft_runner.serving.janitor", str(tmpdir))
        assert len(ranks) == 2 and len(processes) >= 2 + 1 + 4 + 1, processes  # ranks, Triton, 4 stubs, janitor
        _end(server, how, rank0, [p for p in ranks if p != rank0][0])
        server.proc.wait(30)
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.log.close()
    deadline = time.time() + 20  # the janitor cleans a moment after rank 0 is gone, then exits
    while time.time() < deadline and any(_alive(p) for p in processes):
        time.sleep(0.25)
    assert not [p for p in processes if _alive(p)], f"{how}: processes left: {processes}"
    assert not _model_folders(tmpdir), f"{how}: Triton model folders left"
    assert not [p.name for p in tmpdir.iterdir() if not p.name.startswith(CACHES)], f"{how}: left in TMPDIR"
    assert not (_free_shm() - shm_before), f"{how}: /dev/shm files left"
    shutil.rmtree(tmpdir)


def _end(server, how: str, rank0: int, rank1: int) -> None:
    if how == "sigint-rank0":
        os.kill(rank0, signal.SIGINT)
    elif how == "sigterm-rank0":
        os.kill(rank0, signal.SIGTERM)
    elif how == "sigterm-mpirun":
        os.kill(server.proc.pid, signal.SIGTERM)
    else:
        os.kill(rank1, signal.SIGKILL)
