#!/usr/bin/env bash
# Everything GPU-side in one call, within 7.5 minutes (eesmm_jax/tools/gpu_probe.py says what):
#   launch/gpu_probe.sh OUT               # one H100 / H200: OUT/probe.json, probe.md, log.txt
#   launch/gpu_probe.sh --cpu-test OUT    # every phase on a tiny Swin on the CPU (CI)
# Needs JAX (with CUDA), Flax, Optax, Orbax and numpy: what a stock accelerator image has. Pure
# Python wheels it lacks (ml-collections) may travel in .whl/ beside the checkout; they are put
# on PYTHONPATH as they are (a pure wheel imports from its zip): `pip download ml-collections
# --no-deps -d .whl` before the checkout travels. PHASES=step,loop runs only
# those (a rerun of a failed phase); DEADLINE=seconds overrides the preset's.
set -uo pipefail
cd "$(dirname "$0")/.."
preset=gpu
if [ "${1:-}" = "--cpu-test" ]; then preset=cpu-test; shift; fi
out="${1:?usage: launch/gpu_probe.sh [--cpu-test] OUT}"
mkdir -p "$out"
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] && export PYTHONPATH="$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" \
  2>/dev/null || rm -f "$out/nvidia-smi.csv"
args=(--preset "$preset" --out "$out")
[ -n "${PHASES:-}" ] && args+=(--phases "$PHASES")
[ -n "${DEADLINE:-}" ] && args+=(--deadline "$DEADLINE")
"${PYTHON:-python3}" -m eesmm_jax.tools.gpu_probe "${args[@]}" 2> "$out/stderr.txt" \
  | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
