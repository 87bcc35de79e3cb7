#!/usr/bin/env bash
# A TPU pod slice: the same command on every worker; jax.distributed.initialize() finds the
# other workers through the TPU metadata server. bfloat16 compute.
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/eesmm_swin_base_192.py \
#       --workdir gs://bucket/eesmm_b192 --config.data.data_dir=gs://bucket/tfds
#
# Expects: gcloud authenticated for the project, the TPU VM created, this repository at
# ~/eesmm_jax on every worker (it installs the `tpu` extra there), workdir and data on GCS.
set -euo pipefail
[[ $# -ge 3 ]] || { echo "usage: $0 TPU_NAME ZONE <arguments of python -m eesmm_jax.main>" >&2; exit 2; }
command -v gcloud >/dev/null || { echo "$0: gcloud not found" >&2; exit 2; }
tpu=$1 zone=$2
shift 2
# bfloat16 by default; a --config.dtype of the user's own, later on the line, wins.
. "$(dirname "$0")/lib.sh"
with_config_default dtype=bfloat16 "$@"
args=$(printf '%q ' "${ARGS[@]}")
gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" --format='value(state)' | grep -q READY \
  || { echo "$0: TPU $tpu in $zone is not READY" >&2; exit 2; }
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e; cd ~/eesmm_jax || { echo 'no ~/eesmm_jax on this worker' >&2; exit 2; }
  [ -d .venv ] || python3 -m venv .venv; . .venv/bin/activate
  python -c 'import libtpu' 2>/dev/null || pip install -q -e '.[tpu]'
  TF_CPP_MIN_LOG_LEVEL=2 python -m eesmm_jax.main $args"
