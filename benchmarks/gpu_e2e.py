"""End to end on GPUs: `server.py` under mpirun (one GPU per rank), queried with `client.py`.

    python3 benchmarks/gpu_e2e.py --tp 2 [--data-type fp32]

Makes the tiny random GPT-2 of the tests, starts
`mpirun --allow-run-as-root -n TP python3 server.py --tp TP --hf-model-name DIR ...`, waits for
/v2/health/ready, then runs `python3 client.py --json` over HTTP and over gRPC, and `--stream`
over gRPC, and compares every generation with HF transformers' greedy one (fp32 by default, so
the tokens must be equal). Prints `E2E ok|FAIL ...` lines; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "The class statement", "x"]
NEW = 12


def expected(model_dir: Path) -> dict:
    import transformers
    from helpers import hf_greedy

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        full = hf_greedy(model_dir, ids, NEW)
        out[prompt] = (tokenizer.decode(full, skip_special_tokens=True), full[len(ids):])
    return out


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def client(*args: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "client.py"), "--model-name", "tiny", "--output-len", str(NEW), "--json",
           "--prompts", *PROMPTS, *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--data-type", default="fp32")
    p.add_argument("--workdir", default="/tmp/ft_runner_e2e")
    p.add_argument("--mpirun", default="mpirun")
    args = p.parse_args(argv)
    from helpers import make_tiny_gpt2

    work = Path(args.workdir)
    model = make_tiny_gpt2(work / "tiny-gpt2")
    want = expected(model)
    http, grpc, metrics = 8000, 8001, 8002
    cmd = [args.mpirun, "--allow-run-as-root", "--bind-to", "none", "-n", str(args.tp), sys.executable,
           str(ROOT / "server.py"), "--tp", str(args.tp), "--hf-model-name", str(model), "--model-name", "tiny",
           "--data-type", args.data_type, "--output-dir", str(work / "ft_models"), "--bind-address", "127.0.0.1",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    log = open(work / "server.log", "w")
    print("E2E server:", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ok = True
    try:
        start = time.time()
        while not ready(http):
            if server.poll() is not None or time.time() - start > 300:
                raise RuntimeError(f"server did not become ready:\n{(work / 'server.log').read_text()[-4000:]}")
            time.sleep(0.5)
        print(f"E2E ready after {time.time() - start:.1f} s", flush=True)
        for name, url, extra in (("http", f"http://127.0.0.1:{http}", ()), ("grpc", f"grpc://127.0.0.1:{grpc}", ()),
                                 ("stream", f"grpc://127.0.0.1:{grpc}", ("--stream",))):
            rows = client("--url", url, *extra)
            if name == "stream":
                got = [row["tokens"] for row in rows]
                good = got == [want[p][1] for p in PROMPTS]
            else:
                got = [row["sentences"][0] for row in rows]
                good = got == [want[p][0] for p in PROMPTS]
            ok &= good
            print(f"E2E {'ok  ' if good else 'FAIL'} tp={args.tp} {args.data_type} {name}: {len(rows)} prompts "
                  f"{'equal HF greedy' if good else f'differ: {got}'}", flush=True)
    except Exception as exc:  # report, then always stop the server
        ok = False
        print(f"E2E FAIL {exc}", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            code = server.wait()
        log.close()
        print(f"E2E server exited with {code} after SIGTERM", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
