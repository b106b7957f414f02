"""No leftovers on any way a server ends (issue 18): SIGINT or SIGTERM to rank 0, SIGTERM to mpirun.
Each run has its own TMPDIR; the test counts processes, /dev/shm files and Triton's model folders
before and after (helpers.leftovers). A rank SIGKILLed, rank 0 or a worker, is tests/test_load.py's:
under load, with the same checks."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest
from helpers import Server, leftovers, shm_free_files

from ft_runner.serving.janitor import orphans


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint-rank0", "sigterm-rank0", "sigterm-mpirun"])
def test_no_leftovers_however_the_server_ends(tiny_gpt2, tmp_path, how):
    tmpdir = Path(tempfile.mkdtemp(prefix="ftr-", dir="/tmp"))  # short: PyTriton puts Unix sockets in it
    shm_before = shm_free_files()
    server = Server(2, "--tp", "2", "--hf-model-name", str(tiny_gpt2), "--openai-port", "0", tmp=tmp_path,
                    env={"TMPDIR": str(tmpdir)}).start()
    try:
        ranks = server.rank_pids()
        rank0 = server.rank0_pid()
        processes = ranks + orphans(tmpdir)  # everything started from PyTriton's workspace in it, the janitor too
        assert len(ranks) == 2 and len(processes) >= 2 + 1 + 4 + 1, processes  # ranks, Triton, 4 stubs, janitor
        _end(server, how, rank0)
        server.proc.wait(30)
    finally:
        if server.proc.poll() is None:
            server.kill_session()
        server.log.close()
    left = leftovers(processes, tmpdir, shm_before)
    assert not left, f"{how}: left behind: {left}"


def _end(server, how: str, rank0: int) -> None:
    if how == "sigint-rank0":
        os.kill(rank0, signal.SIGINT)
    elif how == "sigterm-rank0":
        os.kill(rank0, signal.SIGTERM)
    else:
        os.kill(server.proc.pid, signal.SIGTERM)
