#!/usr/bin/env bash
# The paper-size timing table on ONE GPU.
#   pip install -e '.[cuda12,torch]'      # JAX with CUDA 12 (V100 included) + torch/timm
#   launch/benchmark_gpu.sh [OUT_DIR]     # default ./timing_gpu; then copy OUT_DIR/timing.md
# Needs no TensorFlow (the benchmark keeps one batch on the device; --loop feeds synthetic data):
# jax, flax, optax, orbax-checkpoint, ml-collections, torch and timm are enough.
#
# 1. OUT_DIR: Swin-B 192/6 and 224/7 (SimMIM, EESMM n=2, n=3, torch eager, torch.compile), 96
#    images per step, bf16 on Ampere and newer (fp16 on V100). On one H200 (2026-11-27) a JAX
#    cell took about 1.5 min (the step's compile 44-51 s of it), torch.compile's 1.5 min (94 s
#    compile), eager's 15 s: about 14 min in all. TIME_BUDGET=seconds stops starting new cells
#    after that many seconds (the skipped ones are listed in timing.md); timing.* are rewritten
#    after every cell, so a cut run keeps its finished rows.
# 2. OUT_DIR/remat: Swin-B 192/6 SimMIM with and without rematerialisation (the allocator's peak
#    memory and the step time), each also timed as the whole trainer loop (--loop): ~5 min.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-timing_gpu}"
py="${PYTHON:-python3}"
mkdir -p "$out/remat"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" || true
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
# JAX and torch share the GPU in one process: JAX's pool gets half of it, torch the rest.
# (peak_bytes_in_use counts live buffers, not the pool, so the per-cell peaks stay meaningful.)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
"$py" -m eesmm_jax.tools.benchmark --preset gpu --backbones swin_base --out "$out" \
  --time_budget "${TIME_BUDGET:-0}" 2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
"$py" -m eesmm_jax.tools.benchmark --preset gpu --backbones swin_base --sizes 192/6 --methods simmim \
  --torch none --remat none,full --loop --steps 5 --warmup 1 --out "$out/remat" 2>&1 \
  | tee -a "$out/log.txt"
echo "wrote $out/timing.{json,md,png} and $out/remat (exit $status, ${PIPESTATUS[0]})"
# Swin-L (48 images per step), and cuDNN's fused attention (Swin-B 192/6: window area 36 is
# even; 224/7's 49 stays on XLA), each a separate run:
#   python -m eesmm_jax.tools.benchmark --preset gpu --backbones swin_large --out "$out/large"
#   python -m eesmm_jax.tools.benchmark --preset gpu --backbones swin_base --sizes 192/6 \
#     --torch none --attention cudnn --out "$out/cudnn"
