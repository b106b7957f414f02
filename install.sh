#!/usr/bin/env bash
# Install ft_runner into a virtual environment and check that its parts start.
#
#   bash install.sh                    create .venv, install the pinned requirements, check mpirun + PyTriton
#   bash install.sh --demo             the same, then serve the embedded tiny GPT-2 on 2 CPU ranks (TP=2),
#                                      query it with client.py and stop it: no network needed
#   bash install.sh --torch cpu|cuda|skip   which torch build (default: cuda where nvidia-smi sees a GPU,
#                                      else cpu; skip keeps the torch already in the venv)
#   bash install.sh --wheelhouse DIR   download every wheel the install needs into DIR and stop there:
#                                      for air-gapped clusters (same Python version and --torch as the nodes)
#   bash install.sh --offline DIR      install from DIR only (pip --no-index --find-links DIR): no network
#
# Environment: VENV (default .venv), PYTHON (default python3), TORCH_VARIANT (as --torch),
#   TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu; used when reachable, as PyPI's
#   torch wheel for Linux is the CUDA build), TORCH_CUDA_INDEX (default none: PyPI's wheel; e.g.
#   https://download.pytorch.org/whl/cu128), FT_RUNNER_REQUIREMENTS (default requirements.txt; for tests).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
REQUIREMENTS=${FT_RUNNER_REQUIREMENTS:-requirements.txt}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_CUDA_INDEX=${TORCH_CUDA_INDEX:-}
torch_variant=${TORCH_VARIANT:-}
demo=0 wheelhouse="" offline=""

usage() { sed -n '2,17p' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) demo=1 ;;
    --torch) torch_variant=${2:-}; shift ;;
    --torch=*) torch_variant=${1#--torch=} ;;
    --wheelhouse) wheelhouse=${2:-}; shift ;;
    --offline) offline=${2:-}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see bash install.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "install.sh: $*" >&2; exit 1; }
if [ -z "$torch_variant" ]; then
  torch_variant=cpu
  if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then torch_variant=cuda; fi
fi
case "$torch_variant" in cpu|cuda|skip) ;; *) die "--torch must be cpu, cuda or skip (got '$torch_variant')" ;; esac
[ -z "$wheelhouse" ] || [ -z "$offline" ] || die "--wheelhouse and --offline exclude each other"
[ -f "$REQUIREMENTS" ] || die "no requirements file $REQUIREMENTS"
[ -z "$offline" ] || [ -d "$offline" ] || die "--offline $offline: no such directory (make it with --wheelhouse)"

# pip, without the "Location ... is ignored" warnings that extra local indexes cause, keeping pip's exit status.
pip() {
  local rc=0
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || rc=${PIPESTATUS[0]}
  return "$rc"
}

# The requirements to install: without torch for --torch skip.
requirements() {
  if [ "$torch_variant" = skip ]; then
    grep -vE '^torch([=<>!~ ;[]|$)' "$REQUIREMENTS" >"$VENV/requirements-without-torch.txt"
    echo "$VENV/requirements-without-torch.txt"
  else
    echo "$REQUIREMENTS"
  fi
}

# Where torch's build for the variant comes from, as pip arguments.
torch_index_args() {
  if [ "$torch_variant" = cuda ] && [ -n "$TORCH_CUDA_INDEX" ]; then
    echo "--extra-index-url $TORCH_CUDA_INDEX"
  elif [ "$torch_variant" = cpu ]; then
    if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
         "$TORCH_CPU_INDEX/" >/dev/null 2>&1; then
      echo "--extra-index-url $TORCH_CPU_INDEX"
    else
      echo "install.sh: $TORCH_CPU_INDEX is unreachable: torch comes from pip's own indexes" >&2
    fi
  fi
}

installed_torch_build() {
  "$VENV/bin/python" -c "import torch; print('cuda' if torch.version.cuda else 'cpu')" 2>/dev/null || echo none
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
shown=$VENV  # as the user gave it, for the commands printed at the end
VENV=$(cd "$VENV" && pwd)
reqs=$(requirements)

if [ -n "$wheelhouse" ]; then
  mkdir -p "$wheelhouse"
  # shellcheck disable=SC2046  # torch_index_args is a list of words
  pip download -q -r "$reqs" -d "$wheelhouse" $(torch_index_args)
  pip download -q "setuptools>=64" -d "$wheelhouse"  # builds the project itself at --offline time
  echo "wheelhouse: $(find "$wheelhouse" -maxdepth 1 -name '*.whl' | wc -l) wheels in $wheelhouse (torch: $torch_variant," \
       "Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'))"
  echo "Next, on the cluster: copy $wheelhouse and this checkout there, then: bash install.sh --offline $wheelhouse"
  exit 0
fi

current=$(installed_torch_build)
if [ "$torch_variant" != skip ] && [ "$current" != none ] && [ "$current" != "$torch_variant" ]; then
  echo "install.sh: replacing the $current build of torch by the $torch_variant build"
  pip uninstall -q -y torch
fi
if [ -n "$offline" ]; then
  pip install -q --no-index --find-links "$offline" -r "$reqs" "setuptools>=64"
else
  # shellcheck disable=SC2046
  pip install -q -r "$reqs" "setuptools>=64" $(torch_index_args)
fi
# The project itself, editable (a change in the checkout needs no reinstall), with its entry points
# ft-runner-server, ft-runner-client, ft-runner-convert; its dependencies are the pinned ones above.
pip install -q --no-deps --no-build-isolation -e .
pip check >/dev/null || { pip check; exit 1; }

# Check that the parts start: torch (and which build), 2 MPI ranks that talk, PyTriton's tritonserver.
build=$(installed_torch_build)
[ "$build" != none ] || die "torch is not installed in $VENV (--torch skip keeps an existing one only)"
if [ "$torch_variant" = cuda ] && [ "$build" = cpu ]; then
  [ -z "$offline" ] || die "--torch cuda, but $offline holds torch's CPU build: make it with --wheelhouse DIR --torch cuda"
  die "--torch cuda, but pip installed torch's CPU build: set TORCH_CUDA_INDEX, e.g." \
      "TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128 bash install.sh --torch cuda"
fi
"$VENV/bin/python" -c "import torch, transformers, pytriton.triton; print('torch', torch.__version__, '|', 'CUDA available' if torch.cuda.is_available() else 'no GPU visible')"
(cd / && "$VENV/bin/ft-runner-convert" --help >/dev/null) || die "ft_runner is not importable from outside the checkout"
export PATH="$VENV/bin:$PATH"
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
mpirun --version | head -n 1
mpirun -n 2 --oversubscribe python -c "from mpi4py import MPI; assert MPI.COMM_WORLD.allreduce(1) == 2" \
  || die "mpirun -n 2 could not start two ranks that talk to each other"
tritonserver=$("$VENV/bin/python" -c "import os, pytriton; print(os.path.dirname(pytriton.__file__))")/tritonserver/bin/tritonserver
help=$("$tritonserver" --help 2>&1 || true)  # --help exits with 1
grep -q "^Usage: tritonserver" <<<"$help" || die "PyTriton's tritonserver does not start: $tritonserver --help said: $help"
echo "mpirun: 2 ranks OK | PyTriton: tritonserver starts"

if [ "$demo" = 1 ]; then
  log=$(mktemp)
  mpirun -n 2 --oversubscribe python server.py --tp 2 --bind-address 127.0.0.1 >"$log" 2>&1 &
  server=$!
  # mpirun's own status after SIGTERM says nothing about the demo: the demo's is the client's
  trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
  for _ in $(seq 120); do
    curl -sf localhost:8000/v2/health/ready >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 1
  done
  python client.py --url http://127.0.0.1:8000 --prompts "Thank you for" "Q: Are you going for lunch?" --init-timeout-s 60
else
  root_flag=""; [ "$(id -u)" != 0 ] || root_flag=" --allow-run-as-root"
  echo "installed. Next: $shown/bin/mpirun$root_flag -n 2 $shown/bin/python server.py --tp 2"
  echo "   then:      $shown/bin/python client.py --url http://localhost:8000 --prompts \"Thank you for\""
fi
