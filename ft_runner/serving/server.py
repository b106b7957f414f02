"""`server.py`: convert on rank 0, load every rank's shard, serve from rank 0 through PyTriton."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from pathlib import Path

from ft_runner.config import ConfigError, QuantConfig

LOG = logging.getLogger("ft_runner")
# After a fault, rank 0 gives the failed requests' errors this long to reach their clients, and the
# other ranks wait at most this long for rank 0 to end the job before ending it themselves.
ANSWER_GRACE_S = 0.5
WORKER_WAIT_S = 5.0
ACCESS_TOKEN_ENV = "FT_RUNNER_ACCESS_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a HuggingFace causal LM over a TP x PP grid of MPI ranks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hf-model-name", default=None,
                   help="hub id or local HF directory (None: the embedded tiny GPT-2, no network)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit; None: main)")
    p.add_argument("--output-dir", default="ft_models", help="where converted checkpoints go")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the rank's local GPU if there are GPUs, else the CPU")
    p.add_argument("--data-type", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="inference dtype (auto: fp16 on GPUs, fp32 on CPUs)")
    p.add_argument("--weight-data-type", choices=("fp32", "fp16", "bf16", "int8"), default=None,
                   help="dtype of the converted files (None: the inference dtype; int8: the layers' kernels "
                        "per-output-channel int8, served with --quantization int8_wo)")
    p.add_argument("--quantization", choices=("none", "int8_wo", "fp8"), default=None,
                   help="int8_wo: int8 weights, activations in --data-type (FT's --int8-mode 1); fp8: e4m3 weights "
                        "and per-token e4m3 activations (GPUs with FP8: sm_89+). The layers' projections only: "
                        "embeddings and the LM head stay in --data-type (None: none, int8_wo for an int8 checkpoint)")
    p.add_argument("--int8-mode", type=int, choices=(0, 1, 2), default=0,
                   help="FT's name: 1 = --quantization int8_wo (2, SmoothQuant, is refused)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="the in-flight engine's paged KV cache: auto = --data-type; fp8 = e4m3, one scale per layer "
                        "(GPUs with FP8)")
    p.add_argument("--model-name", default=None,
                   help="served model name (None: the model name with non-word characters replaced by _)")
    p.add_argument("--token-model-name", default="fastertransformer",
                   help="name of the token-id model with fastertransformer_backend's GPT contract")
    p.add_argument("--stream-model-name", default=None,
                   help="name of the decoupled (streaming) text model (None: <model name>_stream)")
    p.add_argument("--max-batch-size", type=int, default=128, help="Triton's dynamic-batching limit (rows)")
    p.add_argument("--bind-address", default="0.0.0.0",
                   help="address the HTTP, gRPC, metrics and OpenAI ports bind to (0.0.0.0: every interface, "
                        "as FT's example; use 127.0.0.1 to serve this machine only)")
    p.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton's metrics port (its nv_* metrics)")
    p.add_argument("--openai-port", type=int, default=0,
                   help="serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /metrics) "
                        "on this port too; 0 = off")
    p.add_argument("--max-concurrent-requests", type=int, default=256,
                   help="OpenAI API: requests in flight (running or waiting) beyond this are answered 429")
    p.add_argument("--max-queue-len", type=int, default=0,
                   help="both APIs: a request is refused (OpenAI 429, Triton UNAVAILABLE) while this many requests "
                        "wait for the engine; Triton's own queue of the text and token models holds no more either; "
                        "0 = no limit")
    p.add_argument("--request-timeout-s", type=float, default=0.0,
                   help="both APIs: a request still running this long after it arrived is stopped, its KV pages "
                        "freed, and answered with a timeout error (OpenAI 504, Triton UNAVAILABLE); a request may ask "
                        "for less (Triton's `timeout` parameter, OpenAI's extra `timeout`); 0 = no deadline")
    p.add_argument("--health-timeout-s", type=float, default=10.0,
                   help="the `health` model fails when a one-token generation through all ranks takes longer")
    _engine_arguments(p)
    p.add_argument("--trust-remote-code", action="store_true", help="let HF run code from the model repo")
    p.add_argument("--verbose", action="store_true", help="Triton's verbose log, and log lines from every rank")
    return p


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    """The in-flight engine's knobs: config.EngineConfig, whose defaults they show."""
    from ft_runner.config import EngineConfig

    d = EngineConfig()
    g = p.add_argument_group("in-flight engine")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="requests in the running batch at most")
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens one step computes at most (prefill chunks and decodes together)")
    g.add_argument("--kv-block-size", type=int, default=d.kv_block_size, help="tokens per KV-cache page")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of GPU memory for weights, activations and the KV cache, which gets the rest")
    g.add_argument("--kv-cache-blocks", type=int, default=d.kv_cache_blocks,
                   help="KV-cache pages per rank (0: from free memory; on CPUs from --cpu-kv-cache-gib)")
    g.add_argument("--cpu-kv-cache-gib", type=float, default=d.cpu_kv_cache_gib, help="the KV cache's size on CPUs")
    g.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="prompt + output tokens of one request at most (0: the model's context)")
    g.add_argument("--no-chunked-prefill", action="store_true", help="admit a prompt only when it fits one step")
    g.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt in full (default: reuse the KV pages of a prompt's cached prefix)")


def engine_config(args):
    from ft_runner.config import EngineConfig

    return EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_block_size=args.kv_block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                        kv_cache_blocks=args.kv_cache_blocks, cpu_kv_cache_gib=args.cpu_kv_cache_gib,
                        max_model_len=args.max_model_len, enable_chunked_prefill=not args.no_chunked_prefill,
                        cuda_graphs=not args.no_cuda_graphs, enable_prefix_caching=not args.no_prefix_caching)


def serving_config(args):
    from ft_runner.config import ServingConfig

    return ServingConfig(request_timeout_s=args.request_timeout_s, max_queue_len=args.max_queue_len,
                         max_concurrent_requests=args.max_concurrent_requests)


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
    except Exception as exc:
        traceback.print_exc()
        _end_job_after_fault(comm, exc)
        return 1


def _end_job_after_fault(comm, exc: Exception) -> None:
    """End every rank, non-zero, without leaving rank 0's clients unanswered: close this rank's
    collectives so peers blocked in one fail at once, give rank 0 a moment to send the errors, abort."""
    import torch.distributed as dist

    rank = comm.Get_rank()
    print(f"error: rank {rank} failed ({_one_line(exc)}); ending the job", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    time.sleep(ANSWER_GRACE_S if rank == 0 else WORKER_WAIT_S)
    comm.Abort(1)  # never leave the other ranks waiting in a collective


def _serve(args, comm) -> int:
    from ft_runner import parallel
    from ft_runner.checkpoint.convert import convert
    from ft_runner.checkpoint.load import load_stage
    from ft_runner.engine.core import EngineCore
    from ft_runner.engine.generator import Generator
    from ft_runner.hub import resolve_model
    from ft_runner.serving.frontend import Frontend
    from ft_runner.serving.protocol import Channel
    from ft_runner.serving.quiet import quiet_known_noise

    limits = serving_config(args)  # checked before anything loads
    runtime = parallel.init_runtime(args.tp, args.pp, args.device)
    quiet_known_noise(cpu=runtime.device.type != "cuda")  # every rank: see quiet.py
    dtype = args.data_type if args.data_type != "auto" else ("fp16" if runtime.device.type == "cuda" else "fp32")
    weight_dtype = args.weight_data_type or dtype
    quant = QuantConfig.from_flags(args.quantization, args.int8_mode, args.kv_cache_dtype, args.weight_data_type)
    parallel.agree(comm, lambda: quant.check_device(runtime.device))  # before converting anything

    def prepare() -> str:
        _check_ports(args)
        source = resolve_model(args.hf_model_name, args.revision)
        out = Path(args.output_dir).resolve() / source.key
        path = convert(source.path, out, args.tp, weight_dtype, args.trust_remote_code, log=LOG.info)
        return f"{path}\n{args.model_name or source.key}"

    ckpt, model_name = parallel.from_root(comm, prepare).split("\n")
    stage = parallel.agree(comm, lambda: _load(load_stage, Path(ckpt), runtime, dtype, quant))
    if runtime.rank == 0:  # agree() is an allgather: every rank holds its shard by now
        LOG.info("all %d ranks loaded their shards", runtime.grid.world)
    generator = Generator(stage, runtime)
    core = EngineCore(stage, runtime, engine_config(args))  # every rank: the cache's size is agreed collectively
    channel = Channel(comm)
    LOG.info("rank %d: TP %d/%d PP %d/%d on %s, %d layers loaded, %d KV pages of %d tokens", runtime.rank,
             runtime.grid.tp_rank, args.tp, runtime.grid.pp_rank, args.pp, runtime.device, len(stage.layers),
             core.runner.pages, args.kv_block_size)
    if runtime.rank == 0:
        _serve_rank0(args, ckpt, model_name, Frontend(core, generator, channel, limits=limits), runtime)
    else:
        _serve_worker(core.runner, generator, channel)
    parallel.shutdown(runtime)
    return 0


def _check_ports(args) -> None:
    """Refuse a taken port before loading anything (Triton would fail later, and less clearly)."""
    ports = [("--http-port", args.http_port), ("--grpc-port", args.grpc_port), ("--metrics-port", args.metrics_port),
             ("--openai-port", args.openai_port)]
    for flag, port in ports:
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in args.bind_address else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((args.bind_address, port))
            except OSError as exc:
                raise ConfigError(f"{flag} {port}: cannot listen on {args.bind_address}:{port} ({exc.strerror}); "
                                  "stop what holds it or choose another port") from None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load(load_stage, ckpt: Path, runtime, dtype: str, quant):
    """This rank's stage; running out of memory becomes one actionable ConfigError."""
    import torch

    from ft_runner.serving import faults

    grid = runtime.grid
    try:
        faults.during_load(grid.rank)
        return load_stage(ckpt, grid, runtime.tp_group, dtype, runtime.device, quant)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise ConfigError(
            f"rank {grid.rank} (TP {grid.tp_rank}, PP {grid.pp_rank}) ran out of {runtime.device.type} memory "
            f"loading its {dtype} shard ({_one_line(exc)}): spread the model over more ranks (--tp/--pp), use a "
            "smaller --data-type or --quantization, or free memory") from None


def _serve_worker(runner, generator, channel) -> None:
    from ft_runner.serving.worker import run_worker

    # A signal alone does not stop a worker: rank 0 sends STOP once it has drained its requests.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: LOG.warning("signal received; waiting for rank 0 to stop"))
    run_worker(runner, generator, channel)


def _serve_rank0(args, ckpt, model_name, engine, runtime) -> None:
    import transformers
    from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy, TritonSecurityConfig

    from ft_runner.serving.health import INPUTS as HEALTH_INPUTS
    from ft_runner.serving.health import NAME as HEALTH
    from ft_runner.serving.health import OUTPUTS as HEALTH_OUTPUTS
    from ft_runner.serving.health import HealthModel
    from ft_runner.serving.text_model import INPUTS, OUTPUTS, TextModel
    from ft_runner.serving.triton_patch import CancelListener, ship_stub_patch

    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt, trust_remote_code=args.trust_remote_code)
    generator = engine.generator
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
    for sig in (signal.SIGINT, signal.SIGTERM):  # drain: finish what was accepted, refuse the rest at once
        signal.signal(sig, lambda *_: (stop.set(), engine.stop_accepting()))
    workspace = Path(tempfile.mkdtemp(prefix="ft_runner_triton_"))
    _start_janitor(workspace)
    ship_stub_patch()  # per-request errors and cancellation inside Triton's stubs (triton_stub.py)
    CancelListener(engine, workspace / "cancel.sock")
    # Listening (its /health 503) before Triton starts, so that once Triton answers ready every front end does.
    openai = _start_openai(args, engine, tokenizer, generator.model.config, model_name)
    # Triton's model-repository, statistics, trace, logging and shared-memory endpoints need this token
    # (header triton-access-token); without FT_RUNNER_ACCESS_TOKEN it is random and known to no one.
    security = TritonSecurityConfig(access_token=os.environ.get(ACCESS_TOKEN_ENV) or None)
    # A local model store: tritonserver loads every model before it opens its ports, so /v2/health/ready
    # is never 200 with a model missing, and no model goes through Triton's load API (which leaves a
    # /tmp/folderXXXXXX copy of each model when tritonserver is killed).
    policy = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    with Triton(config=config, workspace=workspace / "triton", security_config=security,
                triton_lifecycle_policy=policy) as triton:
        triton.bind(model_name=model_name, infer_func=text_model.infer, inputs=INPUTS, outputs=OUTPUTS,
                    config=text_model.model_config, strict=True)
        _bind_extra_models(triton, args, engine, tokenizer, generator.model.config, model_name)
        health = HealthModel(engine, generator.model.config.end_id, args.health_timeout_s)
        triton.bind(model_name=HEALTH, infer_func=health.infer, inputs=HEALTH_INPUTS, outputs=HEALTH_OUTPUTS,
                    config=health.model_config, strict=True)
        triton.run()
        if openai is not None:
            openai.ready.set()
        LOG.info("serving model %r on http://%s:%d (gRPC %d, metrics %d); rank 0 pid %d", model_name,
                 args.bind_address, args.http_port, args.grpc_port, args.metrics_port, os.getpid())
        try:
            _run_engine(engine, stop, runtime.device)
        except Exception as exc:  # before Triton's slow stop(): the failed requests are being answered
            traceback.print_exc()
            _end_job_after_fault(runtime.comm, exc)
        if openai is not None:
            openai.stop()
        LOG.info("stopping: requests drained")


def _run_engine(engine, stop: threading.Event, device) -> None:
    """Run the engine loop on its own thread and wait for it: a Python signal handler runs on the main
    thread only, which must not be blocked in a collective when SIGTERM asks to drain."""
    errors = []

    def loop():
        try:
            if device.type == "cuda":  # the current device is per thread
                import torch

                torch.cuda.set_device(device)
            engine.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=loop, name="engine")
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if errors:
        raise errors[0]


def _start_openai(args, engine, tokenizer, config, model_name):
    if not args.openai_port:
        return None
    from ft_runner.serving.openai_api import OpenAIServer

    server = OpenAIServer(engine, tokenizer, config, model_name)
    server.serve_in_thread(args.bind_address, args.openai_port)
    LOG.info("OpenAI-compatible API on http://%s:%d/v1 (/health 200 once Triton serves too)", args.bind_address,
             args.openai_port)
    return server


def _bind_extra_models(triton, args, engine, tokenizer, config, model_name: str) -> None:
    """The streaming text model and the FT-backend token model, beside the text model."""
    from ft_runner.serving import stream_model, token_model

    stream = stream_model.StreamModel(engine, tokenizer, config, args.max_batch_size)
    triton.bind(model_name=args.stream_model_name or f"{model_name}_stream", infer_func=stream.infer,
                inputs=stream_model.INPUTS, outputs=stream_model.OUTPUTS, config=stream.model_config, strict=True)
    tokens = token_model.TokenModel(engine, config, args.max_batch_size)
    triton.bind(model_name=args.token_model_name, infer_func=tokens.infer, inputs=token_model.INPUTS,
                outputs=token_model.OUTPUTS, config=tokens.model_config, strict=True)


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
