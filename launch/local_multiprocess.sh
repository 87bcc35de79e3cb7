#!/usr/bin/env bash
# N processes of `python -m eesmm_jax.main` on this machine, K simulated CPU devices each, joined
# by jax.distributed over 127.0.0.1 with gloo collectives: multi-host code run on one machine
# (how the tests and CI exercise it).
#
#   launch/local_multiprocess.sh N_PROCS DEVICES_PER_PROC -- --config configs/demo.py \
#       --workdir /tmp/run [--config.key=value ...]
#
# Expects: python with eesmm_jax importable (activate the venv first). Every process's output
# goes to <stdout> prefixed with [p<i>]; the pid of each is logged at the start.
#
# Stopping. The launcher returns only once every process it started is gone, and leaves none:
# * A process fails (non-zero status, e.g. kill -9): the others are stuck at a collective and
#   cannot save, so they get TERM, then KILL after FAIL_GRACE_S seconds (default 10). Exit
#   status: the failed process's (137 after kill -9).
# * The launcher gets SIGTERM, SIGINT (Ctrl-C) or SIGHUP: every process gets TERM, which a run
#   treats as preemption (it saves a checkpoint, then exits 0), and KILL if it is still running
#   TERM_GRACE_S seconds later (default 300, as long as SLURM's warning in slurm.sbatch: room
#   for a big model's save). A second signal KILLs at once. Exit status: 0 when every process
#   exited 0 (all saved: the same command resumes), else the first non-zero status of a process
#   (137 for one killed at the end of the grace).
set -euo pipefail

usage() { echo "usage: $0 N_PROCS DEVICES_PER_PROC -- <arguments of python -m eesmm_jax.main>" >&2; exit 2; }
[[ $# -ge 3 && "$3" == "--" ]] || usage
nprocs=$1 devices=$2
shift 3
[[ "$nprocs" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] || usage
FAIL_GRACE_S=${FAIL_GRACE_S:-10}
TERM_GRACE_S=${TERM_GRACE_S:-300}
[[ "$FAIL_GRACE_S" =~ ^[0-9]+$ && "$TERM_GRACE_S" =~ ^[0-9]+$ ]] || {
  echo "$0: FAIL_GRACE_S and TERM_GRACE_S must be whole seconds" >&2; exit 2; }
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import eesmm_jax" 2>/dev/null || {
  echo "$0: '$PYTHON' cannot import eesmm_jax: activate the venv (. .venv/bin/activate) or set PYTHON" >&2
  exit 2; }

port=${JAX_COORDINATOR_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

log() { echo "$0: $*" >&2; }

# Only processes not yet reaped are in `pids`: an unreaped pid cannot have been reused, so
# signalling them never hits another program.
pids=()
declare -A index=()  # pid -> i, for messages
status=0             # the exit status: the first non-zero status of a process
stopping=""          # why the processes are being stopped: "", "failed" or "signalled"
deadline=""          # when those still running get KILL, in microseconds (as now_us)
killed=""

now_us() { now=${EPOCHREALTIME/[.,]/}; }  # sets `now`: no subshell, in a trap too
signal_all() { local pid; for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done; }
stop_all() {  # stop_all WHY GRACE_S: TERM now, KILL after GRACE_S
  now_us
  stopping=$1 deadline=$((now + $2 * 1000000))
  signal_all TERM
}
kill_all() {
  [[ -z "$killed" ]] || return 0
  log "killing the processes still running (KILL): ${pids[*]}"
  signal_all KILL
  killed=1
}
on_signal() {
  if [[ -z "$stopping" ]]; then
    log "got SIG$1: asking every process to save and stop (TERM); KILL after ${TERM_GRACE_S}s"
    stop_all signalled "$TERM_GRACE_S"
  else  # the second Ctrl-C, or SLURM's TERM at the time limit: no more waiting
    log "got SIG$1 while stopping"
    kill_all
  fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP
# A safety net should this script itself fail: no process outlives it.
trap 'signal_all KILL' EXIT

for ((i = 0; i < nprocs; i++)); do
  [[ -z "$stopping" ]] || break  # signalled while starting them
  # The relays ignore INT and TERM: they end when their process closes its output, so the
  # messages of a process saving on preemption are not lost (nor is it hit by a broken pipe).
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS_EXTRA:-}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES=$nprocs JAX_PROCESS_ID=$i \
    "$PYTHON" -m eesmm_jax.main "$@" \
      > >(trap '' INT TERM; exec sed -u "s/^/[p$i] /") \
      2> >(trap '' INT TERM; exec sed -u "s/^/[p$i] /" >&2) &
  pids+=($!)
  index[$!]=$i
  log "p$i is pid $!"
done

ended() {  # ended PID STATUS: one of the processes is gone
  local pid remaining=()
  for pid in "${pids[@]}"; do [[ "$pid" == "$1" ]] || remaining+=("$pid"); done
  pids=("${remaining[@]}")
  (($2 != 0)) || return 0
  ((status != 0)) || status=$2
  log "process p${index[$1]} (pid $1) exited with status $2"
  if [[ -z "$stopping" ]]; then
    # They would wait for it at a collective for ever.
    log "stopping the others (TERM; KILL after ${FAIL_GRACE_S}s)"
    stop_all failed "$FAIL_GRACE_S"
  fi
}

# Polls twice a second. The pause is a `read` with a timeout from a pipe that nothing writes:
# traps run during it as each signal arrives (during a foreground `sleep` they would wait for
# it, and two quick Ctrl-Cs would count as one). Not `wait -n`: a signal that lands while
# `wait` blocks can leave bash's job table out of step with its children (a later `wait PID`
# then blocked until another process ended). Bash reaps its children as they end and keeps
# their statuses, so `wait PID` of one that is gone returns at once.
exec {idle}<> <(:)
while ((${#pids[@]} > 0)); do
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" && rc=0 || rc=$?
      ended "$pid" "$rc"
    fi
  done
  ((${#pids[@]} > 0)) || break
  now_us
  if [[ -n "$deadline" ]] && ((now >= deadline)); then
    kill_all
  fi
  read -r -t 0.5 -u "$idle" _ || true
done
trap - EXIT
if [[ "$stopping" == signalled && $status == 0 ]]; then
  log "every process exited 0 after the signal (saved: the same command resumes)"
fi
exit $status
