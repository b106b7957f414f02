#!/usr/bin/env bash
# Container entry point: mpirun -n TP*PP python server.py --tp TP --pp PP [--hf-model-name MODEL] ARGS...
# Environment: TP, PP, MODEL (empty: the embedded tiny GPT-2), OUTPUT_DIR, HTTP_PORT, GRPC_PORT,
# METRICS_PORT; further server.py flags are the container's arguments (docker run IMAGE --data-type bf16).
# `docker stop` (SIGTERM) is passed to rank 0, which drains the requests, stops Triton and releases
# the other ranks; SIGTERM to mpirun itself would make Open MPI kill every rank at once.
set -euo pipefail
args=(--tp "$TP" --pp "$PP" --output-dir "$OUTPUT_DIR"
      --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT")
if [ -n "${MODEL:-}" ]; then args+=(--hf-model-name "$MODEL"); fi

mpirun -n $((TP * PP)) python server.py "${args[@]}" "$@" &
mpirun=$!

# shellcheck disable=SC2317,SC2329  # run by the trap
stop() {
  local pid rank0=""
  for pid in $(pgrep -P "$mpirun" || true); do  # the ranks are mpirun's children
    if grep -qzx OMPI_COMM_WORLD_RANK=0 "/proc/$pid/environ" 2>/dev/null; then rank0=$pid; fi
  done
  # No `return` here: in a trap handler it would end the script with wait's status.
  kill -TERM "${rank0:-$mpirun}" 2>/dev/null || true  # before the ranks exist: mpirun itself
}
trap stop TERM INT

status=0
while :; do
  wait "$mpirun" && status=0 || status=$?
  kill -0 "$mpirun" 2>/dev/null || break  # wait was only interrupted by a signal
done
exit "$status"
