#!/usr/bin/env bash
# The Fashion-MNIST study's GPU preset in one call, on one H100 / H200 (its time budget stops
# starting runs at 400 s; the same command carries on with the seeds not done):
#   launch/study_gpu.sh OUT            # OUT/study.json, study.md, recon.png, runs/, log.txt
#   QUICK=1 launch/study_gpu.sh OUT    # the preset's structure on a tiny Swin (the suite, on the CPU)
# The IDX files travel with the checkout in data/fashion-mnist/ (ignored by git; carry it):
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
# DATA_DIR=... reads them from elsewhere. Needs JAX, Flax, Optax, Orbax and numpy, what a stock
# accelerator image has: no TensorFlow, scikit-learn or clu. ml-collections, which such an image
# lacks, may travel as a pure wheel in .whl/ (`pip download ml-collections --no-deps -d .whl`),
# put on PYTHONPATH as it is. Without matplotlib study.png is not drawn (one line says so).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: [QUICK=1] [DATA_DIR=...] launch/study_gpu.sh OUT}"
data_dir="${DATA_DIR:-data/fashion-mnist}"
if ! ls "$data_dir"/train-images-idx3-ubyte* > /dev/null 2>&1; then
  echo "error: no Fashion-MNIST IDX files in $data_dir: apt-get install dataset-fashion-mnist," \
       "then mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz" \
       "data/fashion-mnist/ (or DATA_DIR=the folder holding them)" >&2
  exit 2
fi
mkdir -p "$out"
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] && export PYTHONPATH="$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" \
  2>/dev/null || rm -f "$out/nvidia-smi.csv"
args=(--preset gpu-fashion --out "$out" --data_dir "$data_dir")
[ -n "${QUICK:-}" ] && args+=(--quick)
"${PYTHON:-python3}" -m eesmm_jax.tools.study "${args[@]}" 2> "$out/stderr.txt" \
  | tee "$out/log.txt"
status="${PIPESTATUS[0]}"
[ "$status" = 0 ] || tail -n 20 "$out/stderr.txt" >&2
exit "$status"
