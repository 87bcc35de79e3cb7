#!/usr/bin/env bash
# N processes of `python -m eesmm_jax.main` on this machine, K simulated CPU devices each, joined
# by jax.distributed over 127.0.0.1 with gloo collectives: multi-host code run on one machine
# (how the tests and CI exercise it).
#
#   launch/local_multiprocess.sh N_PROCS DEVICES_PER_PROC -- --config configs/demo.py \
#       --workdir /tmp/run [--config.key=value ...]
#
# Expects: python with eesmm_jax importable (activate the venv first). Every process's output
# goes to <stdout> prefixed with [p<i>]; the script exits non-zero if any process fails, and
# stops the others then.
set -euo pipefail

usage() { echo "usage: $0 N_PROCS DEVICES_PER_PROC -- <arguments of python -m eesmm_jax.main>" >&2; exit 2; }
[[ $# -ge 3 && "$3" == "--" ]] || usage
nprocs=$1 devices=$2
shift 3
[[ "$nprocs" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] || usage
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import eesmm_jax" 2>/dev/null || {
  echo "$0: '$PYTHON' cannot import eesmm_jax: activate the venv (. .venv/bin/activate) or set PYTHON" >&2
  exit 2; }

port=${JAX_COORDINATOR_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM  # kills what is still running

for ((i = 0; i < nprocs; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS_EXTRA:-}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES=$nprocs JAX_PROCESS_ID=$i \
    "$PYTHON" -m eesmm_jax.main "$@" > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=($!)
done

# Wait for all; the first failure stops the rest (they would wait forever at a collective).
status=0
while ((${#pids[@]} > 0)); do
  wait -n -p done_pid "${pids[@]}" || status=$?
  pids=("${pids[@]/$done_pid}")
  pids=(${pids[@]})
  if ((status != 0)); then
    echo "$0: process with pid $done_pid exited with status $status; stopping the others" >&2
    break
  fi
done
exit $status
