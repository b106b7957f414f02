"""slurm/ft_on_pytriton.sbatch on a real one-node Slurm cluster (slurmctld + slurmd + munged).

The fixture runs the daemons as children of pytest, each in its own session, with no systemd,
no cgroups (proctrack/linuxproc) and no accounting; every file lives under tmp_path and the
ports are free ones, so runs do not collide. The test submits the project's own batch script on CPU with TP=2, queries
the server with client.py, compares with HF transformers and cancels the job.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, VENV_BIN, free_ports, hf_greedy, make_tiny_gpt2, mpi_env, port_free

# The node must carry the host's own name: slurmctld refuses to start elsewhere, and Open MPI under
# srun --mpi=pmix only sees ranks as node-local (shared memory, COMM_TYPE_SHARED) when they match.
NODE = socket.gethostname().split(".")[0]
LIBPMIX = Path("/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so")  # what slurm's mpi_pmix plugin dlopens
SLURM_TOOLS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scancel", "scontrol", "sinfo")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

SLURM_CONF = """\
ClusterName=fttest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge-sock/munge.socket.2
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/slurmd-%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=10
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs=4 RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _missing_slurm() -> str | None:
    missing = [name for name in SLURM_TOOLS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if not LIBPMIX.exists():
        missing.append(f"{LIBPMIX} (libpmix-dev)")
    if missing:
        return "Slurm is not installed (missing: " + ", ".join(missing) + "); .ci/run installs it with apt-get"
    return None


class SlurmCluster:
    """munged, slurmctld and slurmd as foreground children, each in its own session; stopped by PID."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: list[subprocess.Popen] = []
        self.env = dict(
            os.environ, SLURM_CONF=str(base / "etc" / "slurm.conf"), PATH=f"/usr/sbin:{os.environ.get('PATH', '')}"
        )

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        b = self.base
        for sub in ("etc", "state", f"spool/slurmd-{NODE}", "log", "run", "munge-key", "munge-sock"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        (b / "munge-key").chmod(0o700)
        (b / "munge-sock").chmod(0o755)  # clients of other users must reach the socket
        ctld_port, slurmd_port = free_ports(2)
        (b / "etc" / "slurm.conf").write_text(
            SLURM_CONF.format(node=NODE, base=b, ctld_port=ctld_port, slurmd_port=slurmd_port)
        )
        key = b / "munge-key" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], env=self.env, check=True)
        key.chmod(0o400)
        munge_socket = b / "munge-sock" / "munge.socket.2"
        self._spawn(
            "munged",
            "-F",
            "--force",
            f"--socket={munge_socket}",
            f"--key-file={key}",
            f"--pid-file={b}/run/munged.pid",
            f"--log-file={b}/log/munged.log",
            f"--seed-file={b}/munge-key/munged.seed",
        )
        self._wait(munge_socket.exists, timeout, "munged socket")
        self._spawn("slurmctld", "-D", "-i")
        self._spawn("slurmd", "-D", "-N", NODE)
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).strip() == "idle", timeout, "node idle")
        return self

    def _spawn(self, *cmd: str) -> None:
        log = open(self.base / "log" / f"{cmd[0]}.stdout", "w")
        self.procs.append(
            subprocess.Popen(
                cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        log.close()

    def _wait(self, done, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not done():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(
                    f"Slurm test cluster: waiting for {what}: "
                    f"{'exited: ' + ', '.join(dead) if dead else 'timed out'}\n{self.logs()}"
                )
            time.sleep(0.2)

    @property
    def conf(self) -> str:
        return self.env["SLURM_CONF"]

    def run(self, *cmd: str, check: bool = True, env: dict | None = None) -> str:
        out = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}\n{self.logs()}")
        return out.stdout

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, ...)."""
        line = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(f.split("=", 1) for f in line.split() if "=" in f)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((self.base / "log").glob("*"))
        )

    def stop(self) -> None:
        if self.procs:
            self.run("scancel", "--full", "-u", "root", check=False)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def slurm(tmp_path):
    reason = _missing_slurm()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path / "slurm")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _wait_ready(slurm: SlurmCluster, job_id: str, port: int, log: Path, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = slurm.job(job_id).get("JobState", "?")
        if state in TERMINAL:
            pytest.fail(f"job {job_id} ended ({state}) before serving:\n{_read(log)}\n{slurm.logs()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not ready in {timeout}s:\n{_read(log)}\n{slurm.logs()}")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} not written)"


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live (non-zombie) process, read from /proc."""
    procs = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]  # the command name in (...) may hold spaces
        if state != "Z":
            procs[int(proc.name)] = (int(ppid), cmdline)
    return procs


def _job_tree(http_port: int) -> dict[int, str]:
    """The server ranks of this job (found by port) and all their descendants: tritonserver, stubs, janitor."""
    procs = _processes()
    tree = {
        pid
        for pid, (_, args) in procs.items()
        if args.split()[1:2] == ["server.py"] and f"--http-port {http_port}" in args
    }
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return {pid: procs[pid][1] for pid in tree}


def _wait_gone(
    slurm: SlurmCluster, job_id: str, pids: dict[int, str], ports: list[int], timeout: float = 30.0
) -> tuple[str, list[str], list[int]]:
    """Wait until the job is over, its processes are gone and its ports are free; return what is left."""
    deadline = time.time() + timeout
    while True:
        state = slurm.job(job_id).get("JobState", "?")
        alive = _processes()
        left = [f"{pid} {args}" for pid, args in pids.items() if pid in alive and alive[pid][1] == args]
        busy = [p for p in ports if not port_free(p)]
        if (state in TERMINAL and not left and not busy) or time.time() > deadline:
            return state, left, busy
        time.sleep(0.5)


def _served_text(client_stdout: str) -> str:
    """The first prompt's `sentences` (prompt + generation) from `client.py --json`."""
    return json.loads(client_stdout.splitlines()[0])["sentences"][0]


@pytest.mark.slow
def test_sbatch_tp2(slurm, tmp_path, request):
    import transformers

    model = make_tiny_gpt2(tmp_path / "tiny_gpt2")
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "job.out"
    tmp = Path(tempfile.mkdtemp(prefix="ftsl"))  # short: PyTriton puts AF_UNIX sockets (<= 107 bytes) under TMPDIR
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    env = mpi_env(
        SLURM_CONF=slurm.conf,
        MODEL=str(model),
        MODEL_NAME="tiny",
        TP="2",
        PP="1",
        OUTPUT_DIR=str(tmp_path / "ft_models"),
        HTTP_PORT=str(http),
        GRPC_PORT=str(grpc),
        METRICS_PORT=str(metrics),
        BIND_ADDRESS="127.0.0.1",
        VENV=str(VENV_BIN.parent),
        TMPDIR=str(tmp),
        SBATCH_GPUS_PER_TASK="0",
    )  # CPU only: no GPU request
    job_id = slurm.run(
        "sbatch", "--parsable", "--ntasks=2", f"--output={log}", str(ROOT / "slurm" / "ft_on_pytriton.sbatch"), env=env
    ).strip()
    try:
        _wait_ready(slurm, job_id, http, log)
        assert f"rank 0 serves on {NODE}:{http}" in _read(log)
        prompt, new_tokens = "Thank you for", 12
        flags = f"--url http://127.0.0.1:{http} --model-name tiny --output-len {new_tokens} --init-timeout-s 30 --json"
        client = subprocess.run(
            [str(VENV_BIN / "python"), str(ROOT / "client.py"), *flags.split(), "--prompts", prompt],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr + _read(log)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        expected = hf_greedy(model, tokenizer(prompt)["input_ids"], new_tokens)
        assert _served_text(client.stdout) == tokenizer.decode(expected, skip_special_tokens=True)
        job = _job_tree(http)
        task_tmpdirs = sorted(tmp.glob(f"ft_on_pytriton.{job_id}.*"))  # made by task_prolog.sh
        assert len(task_tmpdirs) == 2 and any(d.iterdir() for d in task_tmpdirs), task_tmpdirs  # rank 0 uses its own
        assert sum(args.split()[1:2] == ["server.py"] for args in job.values()) == 2, job
        assert any("tritonserver" in args for args in job.values()), job
    finally:
        slurm.run("scancel", job_id, check=False)
    state, left, busy = _wait_gone(slurm, job_id, job, [http, grpc, metrics])
    assert state == "CANCELLED" and not left and not busy, (
        f"after scancel: job {state}, processes {left}, ports in use {busy}\n{_read(log)}"
    )
    assert not list(tmp.iterdir()), "task_epilog.sh left the tasks' TMPDIRs behind"
