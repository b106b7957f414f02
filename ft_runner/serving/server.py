"""`server.py`: convert on rank 0, load every rank's shard, serve from rank 0 through PyTriton."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading

import traceback
from pathlib import Path

from ft_runner.config import ConfigError

LOG = logging.getLogger("ft_runner")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a HuggingFace causal LM over a TP x PP grid of MPI ranks.")
    p.add_argument("--hf-model-name", default=None,
                   help="hub id or local HF directory (default: the embedded tiny GPT-2, no network)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--output-dir", default="ft_models", help="where converted checkpoints go")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--data-type", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="inference dtype (auto: fp16 on GPUs, fp32 on CPUs)")
    p.add_argument("--weight-data-type", choices=("fp32", "fp16", "bf16"), default=None,
                   help="dtype of the converted files (default: the inference dtype)")
    p.add_argument("--model-name", default=None, help="served model name (default: from the model name)")
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--bind-address", default="0.0.0.0", help="address the HTTP/gRPC/metrics ports bind to")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--trust-remote-code", action="store_true", help="let HF run code from the model repo")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ft_runner import parallel

    comm = parallel.mpi_comm()
    rank = comm.Get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 or args.verbose else logging.WARNING,
                        format=f"[ft_runner rank {rank}] %(message)s")
    try:
        return _serve(args, comm)
    except ConfigError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)  # never leave the other ranks waiting in a collective
        return 1


def _serve(args, comm) -> int:
    from ft_runner import parallel
    from ft_runner.checkpoint.convert import convert
    from ft_runner.checkpoint.load import load_stage
    from ft_runner.engine.generator import Generator
    from ft_runner.hub import resolve_model
    from ft_runner.serving.protocol import Channel

    runtime = parallel.init_runtime(args.tp, args.pp, args.device)
    dtype = args.data_type if args.data_type != "auto" else ("fp16" if runtime.device.type == "cuda" else "fp32")
    weight_dtype = args.weight_data_type or dtype

    def prepare() -> str:
        source = resolve_model(args.hf_model_name, args.revision)
        out = Path(args.output_dir).resolve() / source.key
        path = convert(source.path, out, args.tp, weight_dtype, args.trust_remote_code, log=LOG.info)
        return f"{path}\n{args.model_name or source.key}"

    ckpt, model_name = parallel.from_root(comm, prepare).split("\n")
    stage = parallel.agree(comm, lambda: load_stage(Path(ckpt), runtime.grid, runtime.tp_group, dtype,
                                                    runtime.device))
    generator = Generator(stage, runtime)
    channel = Channel(comm)
    LOG.info("rank %d: TP %d/%d PP %d/%d on %s, %d layers loaded", runtime.rank, runtime.grid.tp_rank,
             args.tp, runtime.grid.pp_rank, args.pp, runtime.device, len(stage.layers))
    if runtime.rank == 0:
        _serve_rank0(args, ckpt, model_name, generator, channel, runtime)
    else:
        _serve_worker(generator, channel)
    parallel.shutdown(runtime)
    return 0


def _serve_worker(generator, channel) -> None:
    from ft_runner.serving.worker import run_worker

    # A signal alone does not stop a worker: rank 0 sends STOP once it has drained its requests.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: LOG.warning("signal received; waiting for rank 0 to stop"))
    run_worker(generator, channel)


def _serve_rank0(args, ckpt, model_name, generator, channel, runtime) -> None:
    import transformers
    from pytriton.triton import Triton, TritonConfig

    from ft_runner.serving.engine import Engine
    from ft_runner.serving.text_model import INPUTS, OUTPUTS, TextModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt, trust_remote_code=args.trust_remote_code)
    engine = Engine(generator, channel)
    text_model = TextModel(engine, tokenizer, generator.model.config, args.max_batch_size)
    _expose_libpython()
    config = TritonConfig(
        http_address=args.bind_address, http_port=args.http_port,
        grpc_address=args.bind_address, grpc_port=args.grpc_port,
        metrics_address=args.bind_address, metrics_port=args.metrics_port,
        allow_gpu_metrics=runtime.device.type == "cuda", exit_timeout_secs=5,
        log_verbose=1 if args.verbose else 0,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workspace = Path(tempfile.mkdtemp(prefix="ft_runner_triton_"))
    _start_janitor(workspace)
    with Triton(config=config, workspace=workspace / "triton") as triton:
        triton.bind(model_name=model_name, infer_func=text_model.infer, inputs=INPUTS, outputs=OUTPUTS,
                    config=text_model.model_config, strict=True)
        triton.run()
        LOG.info("serving model %r on http://%s:%d (gRPC %d, metrics %d); rank 0 pid %d", model_name,
                 args.bind_address, args.http_port, args.grpc_port, args.metrics_port, os.getpid())
        engine.run(stop)
        LOG.info("stopping: requests drained")


def _start_janitor(workspace: Path) -> None:
    """A detached process that cleans up if this one is killed before it can (see janitor.py)."""
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    subprocess.Popen([sys.executable, "-m", "ft_runner.serving.janitor", str(os.getpid()), str(workspace)],
                     env=env, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


def _expose_libpython() -> None:
    """Triton's Python backend stub must load this interpreter's libpython, not the system's."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in paths.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{paths}" if paths else libdir
