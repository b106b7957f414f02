"""Clean up after rank 0 if it is killed hard (e.g. Open MPI's SIGKILL 0.25 s after SIGTERM).

Started by rank 0 in its own session, so a signal to mpirun's process groups does not reach it:
`python -m ft_runner.serving.janitor PID WORKSPACE`. Once PID is gone it SIGKILLs what still runs
from the workspace (tritonserver and its stubs outlive a rank 0 killed under load, holding their
clients' connections open and the shared memory mapped), then removes PyTriton's workspace, any
copy of a model that tritonserver made for a load through its API (`folderXXXXXX` under /tmp or
$TMPDIR, whose config.pbtxt names the workspace; server.py's local model store makes none, this is
for safety) and every shared-memory file in /dev/shm of PyTriton or Open MPI that no
live process still maps, then exits. After a clean exit of rank 0 there is nothing left for it to do.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

SHM = Path("/dev/shm")
PREFIXES = ("pytrtion", "psm_", "sm_segment.")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def files_in_use() -> set[str]:
    """Paths under /dev/shm that some process maps or holds open."""
    used = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            used.update(line.split(None, 5)[-1].strip() for line in (proc / "maps").read_text().splitlines()
                        if "/dev/shm/" in line)
            used.update(os.readlink(fd) for fd in (proc / "fd").iterdir())
        except OSError:
            continue
    return used


def free_shm_files() -> list[Path]:
    """/dev/shm files of PyTriton or Open MPI that no live process maps or holds open."""
    used = files_in_use()
    return [path for path in SHM.iterdir() if path.name.startswith(PREFIXES) and str(path) not in used]


def model_copies(workspace: Path, tmpdir: Path | None = None) -> list[Path]:
    """tritonserver's temporary copies of models loaded through its API whose config names `workspace`
    (or any path under it), in /tmp and in `tmpdir` (default: this process's temporary directory)."""
    roots = {Path("/tmp"), tmpdir or Path(tempfile.gettempdir())}
    found = []
    for root in roots:
        for folder in root.glob("folder??????"):
            try:
                if str(workspace) in (folder / "config.pbtxt").read_text(errors="replace"):
                    found.append(folder)
            except OSError:
                continue
    return found


def orphans(workspace: Path) -> list[int]:
    """Live processes started from the workspace (tritonserver, the Python backend stubs)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if str(workspace).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def end_orphans(workspace: Path, wait_s: float = 5.0) -> None:
    pids = orphans(workspace)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    deadline = time.time() + wait_s
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)


def clean(workspace: Path) -> None:
    for folder in model_copies(workspace):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(workspace, ignore_errors=True)
    for path in free_shm_files():
        path.unlink(missing_ok=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pid, workspace = int(argv[0]), Path(argv[1])
    while alive(pid):
        time.sleep(0.2)
    time.sleep(1.0)  # let the server's children (tritonserver, stubs) die of their parent's death
    end_orphans(workspace)
    clean(workspace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
