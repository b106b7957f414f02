"""Rank 0's side of triton_stub.py: ship it with every model PyTriton binds, and hear cancellations."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

from ft_runner.serving import triton_stub

LOG = logging.getLogger("ft_runner")
STUB_MODULE = "ft_runner_stub"
_IMPORT = (f"\n\nfrom .{STUB_MODULE} import install as _ft_runner_install  # added by ft_runner (triton_patch.py)\n\n"
           "_ft_runner_install(globals())\n").encode()


def ship_stub_patch() -> None:
    """Make PyTriton copy triton_stub.py next to every model's proxy model.py, which imports it.

    PyTriton 0.7 hands Triton each model's files through `Model.get_proxy_model_files` (models loaded
    over Triton's API) or writes them with `Model.generate_model` (a local model store, server.py)."""
    from pytriton.models.model import Model

    _patch_generate_model(Model)

    original = getattr(Model.get_proxy_model_files, "__wrapped__", Model.get_proxy_model_files)

    def get_proxy_model_files(self) -> dict[str, bytes]:
        files = original(self)
        model_py = f"file:{self.model_version}/model.py"
        if model_py not in files:
            raise RuntimeError(f"PyTriton's proxy files are not what ft_runner expects ({sorted(files)}): "
                               "install the PyTriton version of requirements.txt")
        files[model_py] += _IMPORT
        files[f"file:{self.model_version}/{STUB_MODULE}.py"] = Path(triton_stub.__file__).read_bytes()
        return files

    get_proxy_model_files.__wrapped__ = original
    Model.get_proxy_model_files = get_proxy_model_files


def _patch_generate_model(Model) -> None:
    original = getattr(Model.generate_model, "__wrapped__", Model.generate_model)

    def generate_model(self, model_repository: Path) -> None:
        original(self, model_repository)
        version = Path(model_repository) / self.model_name / str(self.model_version)
        model_py = version / "model.py"
        if not model_py.is_file():
            raise RuntimeError(f"PyTriton wrote no {model_py}: install the PyTriton version of requirements.txt")
        model_py.write_bytes(model_py.read_bytes() + _IMPORT)
        (version / f"{STUB_MODULE}.py").write_bytes(Path(triton_stub.__file__).read_bytes())

    generate_model.__wrapped__ = original
    Model.generate_model = generate_model


class CancelListener:
    """Receives the keys of cancelled streaming requests from the stubs and cancels their jobs."""

    def __init__(self, engine, path: Path):
        self.engine = engine
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.environ[triton_stub.SOCKET_ENV] = str(path)  # Triton and its stubs, started later, inherit it
        threading.Thread(target=self._run, name="cancel-listener", daemon=True).start()

    def _run(self) -> None:
        while True:
            key = self.sock.recv(256).decode("utf-8", "replace")
            if self.engine.cancel(key):
                LOG.info("request %s cancelled by its client", key)
