#!/usr/bin/env bash
# The paper-size timing table on ONE GPU, in under 8 minutes; run once where a GPU is lent.
#   pip install -e '.[cuda12,torch]'      # JAX with CUDA 12 (V100 included) + torch/timm
#   launch/benchmark_gpu.sh [OUT_DIR]     # default ./timing_gpu; then copy OUT_DIR/timing.md
#
# Order of the cells (the budget cuts from the end; skipped cells are listed in timing.md):
# Swin-B 192/6 and 224/7 (SimMIM, EESMM n=2, n=3, torch eager, torch.compile), then Swin-L.
# Batch: 96 images per step for Swin-B, 48 for Swin-L; bf16 on Ampere and newer, fp16 on V100.
# --time_budget 380 stops starting new cells after ~6.3 min (one cell costs ~0.5-1.5 min:
# mostly compilation), and `timeout` is the hard stop at 7.5 min; timing.* are rewritten after
# every cell, so a cut run keeps its finished rows.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-timing_gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" || true
export TF_CPP_MIN_LOG_LEVEL=3
# JAX and torch share the GPU in one process: JAX's pool gets half of it, torch the rest.
# (peak_bytes_in_use counts live buffers, not the pool, so the per-cell peaks stay meaningful.)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
timeout --signal=INT 450 python -m eesmm_jax.benchmark --preset gpu --out "$out" \
  --time_budget 380 2>&1 | tee "$out/log.txt"
echo "wrote $out/timing.{json,md,png} (exit ${PIPESTATUS[0]})"
# Item 3 on GPU (a separate ~4 min run): cuDNN fused attention vs the table above, Swin-B 192/6
# (window area 36 is even; 224/7's 49 stays on XLA):
#   python -m eesmm_jax.benchmark --preset gpu --backbones swin_base --sizes 192/6 \
#     --torch none --attention cudnn --out "$out/cudnn"
