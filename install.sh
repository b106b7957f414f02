#!/usr/bin/env bash
# Install ft_runner into a virtual environment and check that its parts start.
#
#   bash install.sh            create .venv, install the pinned requirements, check mpirun + PyTriton
#   bash install.sh --demo     the same, then serve the embedded tiny GPT-2 on 2 CPU ranks (TP=2),
#                              query it with client.py and stop it: no network needed
# Environment: VENV (default .venv), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
demo=0
for arg in "$@"; do
  case "$arg" in
    --demo) demo=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip check >/dev/null || { "$VENV/bin/python" -m pip check; exit 1; }
"$VENV/bin/mpirun" --version | head -n 1
"$VENV/bin/python" -c "import mpi4py.MPI, pytriton.triton, torch, transformers; print('torch', torch.__version__, '| cuda' if torch.cuda.is_available() else '| cpu')"

export PATH="$PWD/$VENV/bin:$PATH"
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
if [ "$demo" = 1 ]; then
  log=$(mktemp)
  mpirun -n 2 --oversubscribe python server.py --tp 2 --bind-address 127.0.0.1 >"$log" 2>&1 &
  server=$!
  trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
  for _ in $(seq 120); do
    curl -sf localhost:8000/v2/health/ready >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 1
  done
  python client.py --url http://127.0.0.1:8000 --prompts "Thank you for" "Q: Are you going for lunch?" --init-timeout-s 60
else
  echo "installed. Next: $VENV/bin/mpirun -n 2 $VENV/bin/python server.py --tp 2"
  echo "   then:      $VENV/bin/python client.py --url http://localhost:8000 --prompts \"Thank you for\""
fi
