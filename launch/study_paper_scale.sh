#!/usr/bin/env bash
# The study's protocol at the paper's scale (not run by us): on ImageNet-1k, SimMIM
# Swin-B 192 for 100 epochs against EESMM n = 2 for 100 and for 200 epochs, then SimMIM's
# 100-epoch fine-tuning at 224 of each encoder, and one table of top-1.
#
#   launch/study_paper_scale.sh WORK TFDS_DATA_DIR [--dry-run]
#
# Each run goes through launch/v100x4.sh (one host, 4 V100s, fp16; LAUNCHER=... to use another,
# e.g. LAUNCHER="python -m eesmm_jax.main"), into WORK/<run>. Re-running the same command
# resumes: a finished pretraining says "nothing to train", a finished fine-tuning re-reads its
# eval.json. The runs are sequential; on a cluster, submit the three pretrainings in parallel.
#
# Device-hours (V100, estimates, not measured by us): the paper's Sec. 4.2 gives 2 GPU-hours an
# epoch for SimMIM 192 Swin-B and 0.47 for EESMM (224) Swin-B, and 2.8 for SimMIM 224, whose
# encoder work per image matches fine-tuning's at 224 (the decoder and head are small):
#   simmim_b192_100ep    100 x 2.0  = 200 V100-hours
#   eesmm2_b192_100ep    100 x 0.47 =  47
#   eesmm2_b192_200ep    200 x 0.47 =  94
#   3 fine-tunings       3 x 100 x 2.8 = 840
#   total                about 1,180 V100-hours (about 12 days on 4 V100s)
# XLA's FLOP counts agree on the pretraining ratio: `python -m eesmm_jax.tools.flops` puts EESMM
# n = 2's train step at about half of SimMIM's per image. Measure your own hardware first with
# `launch/benchmark_gpu.sh` (images/s and device-hours per epoch per cell).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 2 ]]; then
  echo "usage: $0 WORK TFDS_DATA_DIR [--dry-run]" >&2
  exit 2
fi
work=$1 data=$2 dry=${3:-}
launcher=${LAUNCHER:-launch/v100x4.sh}

run() {  # run NAME ARGS...: one trainer command into WORK/NAME
  local name=$1; shift
  echo "== $name: $launcher $* --workdir $work/$name"
  [[ "$dry" == "--dry-run" ]] && return 0
  $launcher "$@" --workdir "$work/$name" --config.data.data_dir="$data"
}

# Pretraining: the n = 1 and n = 2 cases of the same objective code and recipe.
run simmim_b192_100ep --config configs/simmim_swin_base.py:192
run eesmm2_b192_100ep --config configs/eesmm_swin_base_192.py
run eesmm2_b192_200ep --config configs/eesmm_swin_base_192.py --config.optim.epochs=200

# Fine-tuning: the same 100-epoch recipe for every encoder (SimMIM's, for 100-epoch pretraining).
for pre in simmim_b192_100ep eesmm2_b192_100ep eesmm2_b192_200ep; do
  run "ft_$pre" --config configs/finetune_swin_base_224.py:base_100ep \
      --config.init_from="$work/$pre"
done

[[ "$dry" == "--dry-run" ]] && exit 0
python - "$work" <<'EOF'
import json, os, sys
work = sys.argv[1]
print("| pretraining | ImageNet top-1 after fine-tuning |\n|---|---|")
for pre in ("simmim_b192_100ep", "eesmm2_b192_100ep", "eesmm2_b192_200ep"):
  with open(os.path.join(work, f"ft_{pre}", "eval.json")) as f:
    print(f"| {pre} | {json.load(f)['top1']:.2%} |")
EOF
