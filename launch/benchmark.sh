#!/usr/bin/env bash
# Timing tables (SimMIM vs EESMM, JAX vs the PyTorch reference) on this machine.
#   launch/benchmark.sh                      # cpu-small preset into ./timing_cpu-small
#   launch/benchmark.sh --preset gpu --out /tmp/timing --backbones swin_base
# Any flag of `python -m eesmm_jax.tools.benchmark --help` passes through; --preset and --out default.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=cpu-small
out=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec python -m eesmm_jax.tools.benchmark --preset "$preset" --out "${out:-timing_$preset}" "${args[@]}"
