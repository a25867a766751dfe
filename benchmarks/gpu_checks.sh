#!/usr/bin/env bash
# GPU measurements the issues ask for, one part per lease (each fits one 10-minute call):
#   speed      issues 16, 17: benchmarks/triplet_speed.py at the paper's shapes; fegan_speed.py with
#              the paper's VGG19 and full width (float32, then TF32); FEGAN's full-width 200-epoch
#              schedule on bottle with the offline Lite0 FEN (VGG19's weights cannot reach the machine).
#   triplet    issue 17: the bottle-only triplet network at 450 epochs (~2,700 steps, the paper's
#              11-class step count), 40 (the paper's epochs) and 150 (the variant's default is 100):
#              is the gap to 0.90 under-training?
#   simplenet  issue 22: train_speed.py's SimpleNet bottle protocol against PyTorch (and, when
#              .gpu/SimpleNet holds DonaldRR/SimpleNet, its official step), cold then warm compilation
#              cache (~110 s).
#   categories issue 22: all_categories.py with 15 bottle-sized categories: together cold, together
#              warm, one after another cold (~9 minutes at most; each run's log comes back).
# Before the lease, here: python benchmarks/gpu_prepare.py <part>  (fills the git-ignored .gpu/;
# simplenet and categories share theirs).
# Then: device run with carry [".gpu"] and command `bash benchmarks/gpu_checks.sh <part>`.
set -u
part=${1:?usage: bash benchmarks/gpu_checks.sh speed|triplet|simplenet|categories}
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
data=.gpu/data/mvtec_ad
nvidia-smi -L
step() {  # step <seconds> <log name> <command...>: one timed, time-limited piece whose log comes back
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - start)) s"
  tr "\r" "\n" < "$out/$name.log" | grep -v "it/s]\|img/s]\|step/s]\|Delay kernel" | tail -n 14 | cut -c1-240
}
case $part in
  speed)
    step 80 triplet_speed python3 benchmarks/triplet_speed.py --variant mvtec_ad --steps 5 --warmup 2 --score-images 8
    step 110 fegan_speed_fp32 python3 benchmarks/fegan_speed.py --variant mvtec_ad --steps 8 --warmup 2
    step 300 fegan_bottle_full python3 -m adjax.main --config=configs/fegan.py:mvtec_ad_lite0 \
      --config.data.root=$data --config.data.category=bottle --config.model.width=1.0 \
      --config.train.epochs=200 --workdir=/tmp/fegan_full
    cp /tmp/fegan_full/metrics.json "$out/fegan_full_metrics.json" 2>/dev/null
    step 80 fegan_speed_tf32 python3 benchmarks/fegan_speed.py --variant mvtec_ad --steps 8 --warmup 2 --precision tf32
    ;;
  triplet)
    for epochs in 450 40 150; do
      step 170 triplet_$epochs python3 -m adjax.main --config=configs/triplet.py:mvtec_ad_bottle --config.data.root=$data \
        --config.train.epochs=$epochs --workdir=/tmp/triplet_$epochs
      cp /tmp/triplet_$epochs/metrics.json "$out/triplet_${epochs}_metrics.json" 2>/dev/null
    done
    ;;
  simplenet)
    official=(); [ -d .gpu/SimpleNet ] && official=(--official .gpu/SimpleNet)
    export JAX_COMPILATION_CACHE_DIR=/tmp/xla_cache_train_speed
    step 150 train_speed_cold python3 benchmarks/train_speed.py --root $data --measure-epochs 3 "${official[@]}"
    step 120 train_speed_warm python3 benchmarks/train_speed.py --root $data --measure-epochs 3
    ;;
  categories)
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9  # JAX alone there; its feature caches take up to 64 GiB
    step 560 all_categories python3 benchmarks/all_categories.py --config simplenet.py:mvtec_ad --bottle-copies 15 \
      --mvtec $data --workdir /tmp/all_categories --runs together:cold,together:warm,solo:cold \
      --set model.backbone_weights=random --set train.feature_cache_device_mb=65536
    cp /tmp/all_categories/*.log "$out/" 2>/dev/null
    ;;
  *) echo "unknown part '$part': speed, triplet, simplenet or categories"; exit 2 ;;
esac
