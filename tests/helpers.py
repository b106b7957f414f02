"""Shared test helpers: real mpirun servers on free local ports, tiny random HF models."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TOKENIZER_DIR = ROOT / "ft_runner" / "assets" / "tiny-gpt2"


def mpi_env(**extra) -> dict:
    """Environment for mpirun on a CPU box: root allowed, oversubscription, signals to direct children."""
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
        OMPI_MCA_btl="self,sm",
        GLOO_SOCKET_IFNAME="lo",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def mpirun(n: int, *args: str) -> list[str]:
    return [str(VENV_BIN / "mpirun"), "-n", str(n), sys.executable, *args]


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def make_tiny_gpt2(path: Path, seed: int = 0, vocab_extra: int = 3, **overrides) -> Path:
    """A random GPT-2 with the embedded tokenizer; its vocabulary (1027) is odd on purpose."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=len(tokenizer) + vocab_extra, n_positions=128, n_embd=48, n_layer=4, n_head=4,
                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    kwargs.update(overrides)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    with torch.no_grad():  # random weights large enough that greedy outputs vary
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hf_greedy(model_dir: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation (prompt included), stopping at eos like ours."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
    return out[0].tolist()


class Server:
    """`mpirun -n N python server.py ...` on free ports; a context manager that always cleans up."""

    def __init__(self, n: int, *args: str, tmp: Path, ready_timeout: float = 180.0, env: dict | None = None,
                 openai: bool = False):
        self.http, self.grpc, self.metrics, openai_port = free_ports(4)
        self.openai_url = f"http://127.0.0.1:{openai_port}" if openai else None  # ready implies it listens
        args = (*args, "--openai-port", str(openai_port)) if openai else args
        self.cmd = mpirun(n, str(ROOT / "server.py"), *args, "--output-dir", str(tmp / "ft_models"),
                          "--bind-address", "127.0.0.1", "--http-port", str(self.http),
                          "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics))
        self.log_path = tmp / f"server-{self.http}.log"
        self.ready_timeout = ready_timeout
        self.env = env or {}  # extra environment (fault injection)
        self.proc = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc}"

    def launch(self) -> "Server":
        """Starts mpirun, logging to log_path; `start` also waits until the server is ready."""
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=mpi_env(**self.env), stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)
        return self

    def start(self) -> "Server":
        self.launch()
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.kill_session()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if self.ready() and "rank 0 pid" in self.output():
                return self
            time.sleep(0.5)
        self.kill_session()
        raise TimeoutError(f"server not ready in {self.ready_timeout}s:\n{self.output()}")

    def kill_session(self) -> None:
        """SIGKILL every process of the job still in mpirun's session: its ranks have process groups of
        their own, tritonserver is in rank 0's (the janitor, in a session of its own, then cleans up)."""
        subprocess.run(["pkill", "-KILL", "-s", str(self.proc.pid)], check=False)
        self.proc.wait()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metric(self, name: str) -> float:
        """The sum of the OpenAI /metrics samples whose line starts with `name`."""
        text = urllib.request.urlopen(f"{self.openai_url}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rank0_pid(self) -> int:
        return int(re.search(r"rank 0 pid (\d+)", self.output()).group(1))

    def rank_pids(self) -> list[int]:
        """PIDs of the server's python ranks (children of prterun)."""
        out = subprocess.run(["pgrep", "-f", f"server.py.*--http-port {self.http}"], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split() if int(p) != self.proc.pid]

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            ranks = self.rank_pids()
            target = ranks[0] if ranks and sig == "rank0" else self.proc.pid
            os.kill(target, signal.SIGTERM if sig == "rank0" else sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# -- what a job may leave behind -------------------------------------------------------------------------

CACHES = ("torchinductor_",)  # torch's compile cache: the next run reuses it, it is not a leftover


def shm_free_files() -> set[str]:
    """Names of the /dev/shm files of PyTriton or Open MPI that no live process maps or holds open."""
    from ft_runner.serving.janitor import free_shm_files

    return {path.name for path in free_shm_files()}


def leftovers(pids: list[int], tmpdir: Path, shm_before: set[str], wait_s: float = 20.0) -> list[str]:
    """What a job that ran with TMPDIR=tmpdir left: live processes among `pids` (after up to `wait_s`:
    the janitor cleans a moment after rank 0 is gone, then exits), Triton's model folders, files in
    TMPDIR, /dev/shm files that were not there before. Empty: nothing; TMPDIR is then removed."""
    from ft_runner.serving.janitor import alive, model_copies

    deadline = time.time() + wait_s
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.25)
    left = [f"process {p} ({_name(p)})" for p in pids if alive(p)]
    left += [f"Triton model folder {f}" for f in model_copies(tmpdir, tmpdir)]
    left += [f"{tmpdir}/{p.name}" for p in tmpdir.iterdir() if not p.name.startswith(CACHES)]
    left += [f"/dev/shm/{f}" for f in sorted(shm_free_files() - shm_before)]
    if not left:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return left


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"
