#!/usr/bin/env bash
# One host, 4 V100s: fp16 with dynamic loss scaling (V100 has no bf16 tensor cores).
#
#   launch/v100x4.sh --config configs/eesmm_swin_base_192.py --workdir /ckpt/eesmm_b192 \
#       --config.data.data_dir=/data/tfds [--config.key=value ...]
#
# Expects: NVIDIA driver >= 525 (CUDA 12), 4 visible GPUs, this repository; installs the
# `cuda12` extra into .venv (CUDA 13 wheels dropped sm_70). Re-running the same command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v nvidia-smi >/dev/null || { echo "$0: nvidia-smi not found: no NVIDIA driver" >&2; exit 2; }
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader)
count=$(grep -c . <<<"$gpus" || true)
if [[ "$count" -ne 4 ]] || ! grep -q V100 <<<"$gpus"; then
  echo "$0: expects 4 V100s, found $count GPU(s): ${gpus//$'\n'/, }" >&2
  [[ "${EESMM_ANY_GPUS:-0}" == 1 ]] || { echo "(set EESMM_ANY_GPUS=1 to run anyway)" >&2; exit 2; }
fi
[[ -d .venv ]] || python3 -m venv .venv
. .venv/bin/activate
python -c "import jax, jax_plugins.xla_cuda12" 2>/dev/null || pip install -q -e '.[cuda12]'

# Latency-hiding scheduler overlaps the gradient all-reduce with the backward pass; Triton GEMMs
# are off because cuBLAS is faster on sm_70. JAX takes 90% of GPU memory up front (default 75%).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
python -c "import jax; n = jax.device_count(); assert n == 4 or '${EESMM_ANY_GPUS:-0}' == '1', f'JAX sees {n} GPUs: {jax.devices()}'"
# float16 by default; a --config.dtype of the user's own, later on the line, wins.
. launch/lib.sh
with_config_default dtype=float16 "$@"
exec python -m eesmm_jax.main "${ARGS[@]}"
