#!/usr/bin/env bash
# Triton's perf_analyzer on a CPU-only box, fetched on first use:  perf_analyzer.sh [perf_analyzer args...]
#
# Only tritonclient==2.51.0's wheel both ships the binary and runs on glibc 2.36 (Debian 12): 2.60's needs
# glibc 2.38 and 2.73's has none; PyPI's perf-analyzer (0.1.0) is an empty placeholder. The binary links
# libb64.so.0d, taken from the copy the venv's nvidia-pytriton wheel bundles (no system package), and
# libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel; it loads without a GPU). Everything lands in
# $PA_CACHE: nothing outside it and the venv is touched.
set -euo pipefail

PA_CACHE=${PA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ft_runner/perf_analyzer}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PIP=${PIP:-$ROOT/.venv/bin/pip}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$PA_CACHE/bin/perf_analyzer
CUDART=$PA_CACHE/cudart/nvidia/cuda_runtime/lib
LIBS=$PA_CACHE/lib
fetch() {
  mkdir -p "$PA_CACHE"
  if [[ ! -x $BIN ]]; then
    "$PIP" download --quiet tritonclient==2.51.0 --no-deps --only-binary=:all: -d "$PA_CACHE/wheels"
    unzip -q -o -j "$PA_CACHE"/wheels/tritonclient-2.51.0-*.whl 'tritonclient-2.51.0.data/data/bin/perf_analyzer' \
      -d "$PA_CACHE/bin"
  fi
  if [[ ! -e $CUDART/libcudart.so.12 ]]; then
    "$PIP" download --quiet 'nvidia-cuda-runtime-cu12==12.*' --no-deps --only-binary=:all: -d "$PA_CACHE/wheels"
    unzip -q -o "$PA_CACHE"/wheels/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' \
      -d "$PA_CACHE/cudart"
  fi
  if [[ ! -e $LIBS/libb64.so.0d ]]; then
    local bundled
    bundled=$("$PYTHON" -c "import glob, os, pytriton
print(glob.glob(os.path.join(os.path.dirname(pytriton.__file__), '..', 'nvidia_pytriton.libs', 'libb64-*.so.0d'))[0])") \
      || { echo "error: no libb64 in the venv's nvidia-pytriton wheel: run bash install.sh" >&2; exit 1; }
    mkdir -p "$LIBS" && ln -sf "$(readlink -f "$bundled")" "$LIBS/libb64.so.0d"
  fi
}

fetch
export LD_LIBRARY_PATH=$CUDART:$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if missing=$(ldd "$BIN" | grep 'not found'); then
  echo "error: perf_analyzer cannot load: $missing" >&2
  exit 1
fi
exec "$BIN" "$@"
