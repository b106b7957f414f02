"""install.sh as users run it (flags, --wheelhouse then --offline into a fresh venv) and the Docker
files, which cannot be built here: hadolint, shellcheck, compose.yaml's keys, and the container's
entry point run outside a container."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, VENV_BIN, free_ports, mpi_env, port_free

INSTALL = ROOT / "install.sh"
SHELL_SCRIPTS = [
    "install.sh",
    "docker/entrypoint.sh",
    "slurm/ft_on_pytriton.sbatch",
    "slurm/task_prolog.sh",
    "slurm/task_epilog.sh",
]


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _tool(name: str) -> str:
    path = shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it into .venv)")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--torch", "gpu"], "--torch must be cpu, cuda or skip (got 'gpu')"),
        (["--wheelhouse", "a", "--offline", "b"], "--wheelhouse and --offline exclude each other"),
        (["--offline", "/nonexistent/wheels"], "--offline /nonexistent/wheels: no such directory"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_bad_flags_are_refused_before_installing(tmp_path, args, message):
    out = _run("bash", str(INSTALL), *args, env=dict(os.environ, VENV=str(tmp_path / "venv")))
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert not (tmp_path / "venv").exists()


def test_help_lists_every_flag():
    out = _run("bash", str(INSTALL), "--help")
    assert out.returncode == 0
    for flag in ("--demo", "--torch cpu|cuda|skip", "--wheelhouse DIR", "--offline DIR", "TORCH_VARIANT"):
        assert flag in out.stdout


def _offline_env(venv: Path) -> dict:
    """No index, no find-links of this machine, no proxy that works: only the wheelhouse can serve pip."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and "proxy" not in k.lower()}
    dead = "http://127.0.0.1:9"
    env.update({name: dead for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")})
    # PIP_COMPILE=0: no .pyc files at install time (imports write them later); saves about a minute.
    env.update(VENV=str(venv), PIP_CONFIG_FILE=os.devnull, PIP_COMPILE="0")
    return env


@pytest.mark.slow
def test_wheelhouse_then_offline_install(tmp_path):
    venv, wheels = tmp_path / "venv", tmp_path / "wheels"
    start = time.time()
    out = _run("bash", str(INSTALL), "--wheelhouse", str(wheels), env=dict(os.environ, VENV=str(venv)), timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    names = [p.name for p in wheels.glob("*.whl")]
    assert any(n.startswith("torch-2.13.0") for n in names) and any(n.startswith("nvidia_pytriton-") for n in names)
    assert "bash install.sh --offline" in out.stdout
    assert not list(venv.glob("lib/python3*/site-packages/torch")), "--wheelhouse must only download"
    downloaded = time.time() - start

    out = _run("bash", str(INSTALL), "--offline", str(wheels), "--torch", "cpu", env=_offline_env(venv), timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torch 2.13.0" in out.stdout and "mpirun: 2 ranks OK | PyTriton: tritonserver starts" in out.stdout
    assert "installed. Next:" in out.stdout
    # The venv serves from the checkout like the project's own: every requirement importable, pip consistent.
    check = _run(str(venv / "bin" / "python"), "-c", "import ft_runner.serving.server, tritonclient.grpc, mpi4py.MPI")
    assert check.returncode == 0, check.stderr
    print(f"wheelhouse {downloaded:.0f} s, offline install {time.time() - start - downloaded:.0f} s")


def test_dockerfile_passes_hadolint():
    out = _run(_tool("hadolint"), "--no-color", "--failure-threshold", "info", "docker/Dockerfile")
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_contract():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base and "latest" not in base, base
    for needle in (
        "EXPOSE 8000 8001 8002",
        "/v2/health/ready",
        "HEALTHCHECK",
        "USER 10001",
        "bash install.sh --torch",
        'ENTRYPOINT ["/opt/ft_runner/docker/entrypoint.sh"]',
    ):
        assert needle in text, needle


def test_shell_scripts_pass_shellcheck():
    out = _run(_tool("shellcheck"), *SHELL_SCRIPTS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_file():
    import yaml

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    service = compose["services"]["ft_runner"]
    assert (
        ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]
    ).resolve() == ROOT / "docker" / "Dockerfile"
    gpus = service["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert service["init"] is True and service["restart"] == "unless-stopped" and service["shm_size"]
    assert {"hf_cache:/data/hf", "ft_models:/data/ft_models"} <= set(service["volumes"])
    assert set(compose["volumes"]) == {"hf_cache", "ft_models"}
    assert {"8000:8000", "8001:8001", "8002:8002"} <= set(service["ports"])
    assert {"MODEL", "TP", "PP"} <= set(service["environment"])


@pytest.mark.slow
def test_entrypoint_serves_and_stops_gracefully_on_sigterm(tmp_path):
    """docker/entrypoint.sh as `docker run` would start it, minus the container; SIGTERM is `docker stop`."""
    http, grpc, metrics = free_ports(3)
    env = mpi_env(
        TP="2",
        PP="1",
        OUTPUT_DIR=str(tmp_path / "ft_models"),
        HTTP_PORT=str(http),
        GRPC_PORT=str(grpc),
        METRICS_PORT=str(metrics),
    )
    log = open(tmp_path / "entrypoint.log", "w")
    proc = subprocess.Popen(
        [str(ROOT / "docker" / "entrypoint.sh"), "--bind-address", "127.0.0.1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not _model_ready(http):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "entrypoint.log").read_text()
            time.sleep(0.5)
        flags = f"--url http://127.0.0.1:{http} --output-len 4 --json".split()
        client = _run(str(VENV_BIN / "python"), "client.py", *flags, "--prompts", "Thank you for", env=env)
        assert client.returncode == 0, client.stderr
        assert json.loads(client.stdout)["sentences"][0].startswith("Thank you for"), client.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "entrypoint.log").read_text()
        assert "stopping: requests drained" in (tmp_path / "entrypoint.log").read_text()
        deadline = time.time() + 30
        while _group_alive(proc.pid) or not all(port_free(p) for p in (http, grpc, metrics)):
            assert time.time() < deadline, f"left 30 s after the entry point exited: {_group_alive(proc.pid)}"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _group_alive(pgid: int) -> list[str]:
    """Command names of the live (non-zombie) processes in process group `pgid`."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        state, _, pgrp = rest.split()[:3]
        if int(pgrp) == pgid and state != "Z":
            alive.append(name.split("(", 1)[1])
    return alive


def _model_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/tiny_gpt2/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_demo_serves_the_embedded_model_and_exits_0():
    """README's first command, run in the venv the tests use (installed already, so pip finds nothing to do):
    it serves the embedded model on 2 ranks, prints the client's answer and exits 0."""
    if not all(port_free(port) for port in (8000, 8001, 8002)):
        pytest.skip("the demo serves on ports 8000-8002, which are taken here")
    out = _run("bash", str(INSTALL), "--demo", "--torch", "skip", env=mpi_env(VENV=str(VENV_BIN.parent)), timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "prompt: Thank you for" in out.stdout and "sentences: ['Thank you for" in out.stdout, out.stdout[-3000:]
